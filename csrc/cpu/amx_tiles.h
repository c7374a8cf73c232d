// AMX tile configuration shared by the AMX kernels. Include only inside an anonymous namespace of
// a region compiled with #pragma GCC target("amx-tile,...") (internal linkage).

// ldtilecfg's 64-byte operand: palette 1, then bytes per row and rows of each tile register.
struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-7 all 16 rows x 64 bytes (the largest tile); per-thread state, so every thread that
// runs tile instructions calls this first (and _tile_release() when done).
inline void configure_tiles() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  // GCC does not model ldtilecfg's read of cfg: without this barrier it may drop the stores above
  // as dead (seen with GCC 12 -O3 once attend_amx grew: colsb all zero, ldtilecfg -> SIGSEGV).
  __asm__ __volatile__("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}
