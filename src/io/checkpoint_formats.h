#pragma once
// The two on-disk formats of torch.save, each read from the whole file in memory. Private to io.
#include <string>

#include "patchcore/io/checkpoint.h"

namespace patchcore::checkpoint {

StateDict load_legacy(const std::string& bytes, const std::string& name, const CheckpointLimits& limits);
StateDict load_zip(const std::string& bytes, const std::string& name, const CheckpointLimits& limits);
// c10's message without the C++ backtrace it carries.
std::string without_backtrace(const c10::Error& e);

}  // namespace patchcore::checkpoint
