/* AMX tile configuration shared by the engine's C kernels (include where AMX is built). */
#ifndef PAGECHAT_AMX_H
#define PAGECHAT_AMX_H
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    uint8_t palette;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} pc_tile_config;

/* Palette 1, all eight tiles 64 bytes wide; tiles 3 and 4 (the packed matmul's weight tiles)
 * 16 rows, the others `rows` (so rows = 16 gives sixteen everywhere). */
static inline void pc_amx_configure(int rows) {
    pc_tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) {
        c.colsb[t] = 64;
        c.rows[t] = (uint8_t)(t == 3 || t == 4 ? 16 : rows);
    }
    _tile_loadconfig(&c);
}
#endif
