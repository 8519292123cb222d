#include "patchcore/core/error.h"

namespace patchcore {

std::string quote_name(const std::string& s) {
  static const char* digits = "0123456789abcdef";
  std::string out = "'";
  for (size_t i = 0; i < s.size() && i < 200; ++i) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c >= 0x20 && c < 0x7f && c != '\\') {
      out += static_cast<char>(c);
    } else {
      out += std::string("\\x") + digits[c >> 4] + digits[c & 15];
    }
  }
  if (s.size() > 200) out += "...";
  return out + "'";
}

}  // namespace patchcore
