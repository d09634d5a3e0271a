// CRC-32C (Castagnoli, polynomial 0x1EDC6F41, reflected 0x82F63B78), the checksum of iSCSI,
// ext4 and many storage formats. Used for the pieces and the manifest of sharded checkpoints and for saved models.
//
// Crc32c() uses the SSE4.2 crc32 instruction when the CPU has it (x86-64), otherwise a
// slicing-by-8 table; both give the same values (tests compare them). Check value:
// Crc32c("123456789") == 0xE3069283.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace rmoe {

// Continues a running CRC: Crc32cExtend(Crc32c(a), b) == Crc32c(a + b). Start from 0.
uint32_t Crc32cExtend(uint32_t crc, const void* data, size_t size);

inline uint32_t Crc32c(const void* data, size_t size) { return Crc32cExtend(0, data, size); }
inline uint32_t Crc32c(std::string_view bytes) { return Crc32c(bytes.data(), bytes.size()); }

// The table-driven implementation alone (for tests and for CPUs without SSE4.2).
uint32_t Crc32cExtendPortable(uint32_t crc, const void* data, size_t size);
// Whether Crc32cExtend uses the hardware instruction.
bool Crc32cIsHardwareAccelerated();

}  // namespace rmoe
