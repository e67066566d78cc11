// std::bit_cast for C++17: the emulator's float16 / bfloat16 conversions work on the bits.
#pragma once

#include <cstring>
#include <type_traits>

template <typename To, typename From>
inline To simt_bit_cast(const From& from) {
  static_assert(sizeof(To) == sizeof(From) && std::is_trivially_copyable<From>::value, "same size, plain bits");
  To to;
  std::memcpy(&to, &from, sizeof(to));
  return to;
}
