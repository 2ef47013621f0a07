// CopyBytes: memcpy for the bulk copies of KV blocks and collectives' buffers (kilobytes to
// megabytes), without glibc's `rep movsb` path.
//
// glibc before 2.39 (Debian 12 has 2.36) copies from 2 KiB up to its non-temporal threshold with
// `rep movsb` on CPUs that advertise fast string moves, and on AMD Zen 3 and 4 that instruction
// runs about 20 times slower when the destination lies 1 to 31 bytes past the source modulo 4 KiB
// (glibc bug 30994). Measured on this project's AMD EPYC development machine for 4 KiB to 256 KiB:
// 1.8 to 2 GB/s at those offsets, 25 to 45 GB/s at every other. Such an offset is rare (31 in
// 4096), but a buffer pair that has it keeps it for the life of a process, and a collective or a
// tier copy that has it runs at a twentieth of its speed. CopyBytes runs a vector loop in that size
// range instead (as fast as memcpy at every other offset) and memcpy outside it.
#ifndef STRATA_COMMON_COPY_H_
#define STRATA_COMMON_COPY_H_

#include <cstddef>

namespace strata {

// Copies `n` bytes from `src` to `dst`; the ranges must not overlap.
void CopyBytes(void* dst, const void* src, size_t n);

}  // namespace strata

#endif  // STRATA_COMMON_COPY_H_
