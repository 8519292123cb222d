#pragma once
// The one error style: every message starts with where the problem is (a file, a class or a function) and says
// what is wrong, "<where>: <problem>", in one line. Bad arguments throw std::invalid_argument; bad files and data
// throw std::runtime_error or a subclass that names the kind of file (ImageError, CheckpointError, DatasetError).
#include <string>

namespace patchcore {

// A name taken from a file, cut to 200 characters, quoted and escaped, so that a message stays one readable line.
std::string quote_name(const std::string& s);

}  // namespace patchcore
