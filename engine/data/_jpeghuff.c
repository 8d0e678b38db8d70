/*
 * A Huffman decoder for baseline JPEG scans, installed in place of libjpeg-turbo's own.
 *
 * Why.  Entropy decoding is two thirds of a crop's decode on ImageNet-sized photos, and
 * libjpeg-turbo's decoder looks up 8 bits of code at a time and then reads the value bits in
 * a second step.  This one resolves 10 bits at a time and, when a code and its value bits
 * fit in them (most AC coefficients), the coefficient itself in the same lookup.
 *
 * What stays the same.  The coefficients, bit for bit, and everything libjpeg does with
 * damaged data: this is libjpeg-turbo 2.1's jdhuff.c decode_mcu() with faster tables, the
 * same fast path (taken while at least 512 bytes per block of the MCU are left, refilling 6
 * bytes whenever 16 bits or fewer are buffered, handing an MCU that meets a marker to the
 * slow path), the same slow path (8-bit lookahead, refills to 57 bits, the end of the data
 * through the source manager, whose warning "Premature end of JPEG file" comes at the same
 * byte), the same warnings ("Corrupt JPEG data: bad Huffman code", "premature end of data
 * segment") and zero bits after them, the same handling of a bad code in the fast path (a
 * zero symbol, silently) and of coefficients past the 64th.  libjpeg reads the tables and
 * checks them (jpeg_start_decompress) before this decoder is installed.
 * tests/test_jpegroi.py compares every layout, scale and window with TurboJPEG's full decode,
 * and every truncation and hundreds of bit flips with libjpeg's own decoder.
 */
#include "_jpeghuff.h"

#include <stdint.h>
#include <string.h>

#include <jerror.h>

#define LOOKAHEAD 10  /* bits resolved by one lookup of the fast path */
#define LOOKAHEAD8 8  /* libjpeg's, which decides when the slow path refills */
#define MIN_GET_BITS 57 /* libjpeg-turbo with a 64-bit bit buffer */
#define FAST_BYTES_PER_BLOCK 512 /* libjpeg's BUFSIZE: the fast path's margin */

/* The public head of libjpeg's entropy decoder (jpegint.h, not installed everywhere). */
struct huff_entropy_head {
    void (*start_pass)(j_decompress_ptr cinfo);
    boolean (*decode_mcu)(j_decompress_ptr cinfo, JBLOCKROW *MCU_data);
    boolean insufficient_data;
};

/* jpeg_natural_order with libjpeg's 16 extra entries: a corrupt run past the 64th
 * coefficient lands on the last one, as in libjpeg. */
static const int natural_order[64 + 16] = {
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5,
    12, 19, 26, 33, 40, 48, 41, 34, 27, 20, 13, 6, 7, 14, 21, 28,
    35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51,
    58, 59, 52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63,
    63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63};

/* fast[] entries: code length | size << 5 | run << 10 | COMBINED | value << 16; 0 for a code
 * longer than LOOKAHEAD bits (or none).  COMBINED: the code and its value bits fit in
 * LOOKAHEAD bits, and the entry holds the coefficient (sign-extended). */
#define COMBINED (1u << 14)

typedef struct {
    uint32_t fast[1 << LOOKAHEAD];
    int lookup8[1 << LOOKAHEAD8]; /* libjpeg's: length << 8 | symbol, or 9 << 8 */
    int32_t maxcode[18];          /* largest code of each length, -1 if none; [17] sentinel */
    int32_t valoffset[18];        /* huffval index of a length's first code, minus that code */
    const UINT8 *huffval;
} hf_table;

typedef struct {
    struct huff_entropy_head pub;
    uint64_t get_buffer;          /* libjpeg's bit buffer: bits_left valid bits at the bottom */
    int bits_left;
    int last_dc_val[MAX_COMPS_IN_SCAN];
    int blocks;
    const hf_table *dc[D_MAX_BLOCKS_IN_MCU], *ac[D_MAX_BLOCKS_IN_MCU];
    int comp[D_MAX_BLOCKS_IN_MCU];
    boolean dc_needed[D_MAX_BLOCKS_IN_MCU], ac_needed[D_MAX_BLOCKS_IN_MCU];
    hf_table tables[2 * NUM_HUFF_TBLS];
} hf_decoder;

#define HUFF_EXTEND(x, s) \
    ((x) + ((((x) - (1 << ((s) - 1))) >> 31) & (((unsigned int)-1 << (s)) + 1)))

static void
table_build(const JHUFF_TBL *h, int is_dc, hf_table *t)
{
    int l, i, p = 0, x, total = 0;
    int32_t code = 0, codes[257];

    memset(t->fast, 0, sizeof(t->fast));
    for (i = 0; i < (1 << LOOKAHEAD8); i++)
        t->lookup8[i] = (LOOKAHEAD8 + 1) << LOOKAHEAD8;
    t->huffval = h->huffval;
    for (l = 1; l <= 16; l++) {
        for (i = 0; i < h->bits[l] && total < 256; i++)
            codes[total++] = code++;
        code <<= 1;
    }
    for (l = 1; l <= 16; l++) {
        if (h->bits[l]) {
            t->valoffset[l] = p - codes[p];
            p += h->bits[l];
            t->maxcode[l] = codes[p - 1];
        } else {
            t->maxcode[l] = -1;
        }
    }
    t->valoffset[17] = 0;
    t->maxcode[17] = 0xFFFFF;
    p = 0;
    for (l = 1; l <= LOOKAHEAD; l++) {
        for (i = 0; i < h->bits[l]; i++, p++) {
            int sym = h->huffval[p], s = is_dc ? sym : sym & 15, r = is_dc ? 0 : sym >> 4;
            int shift = LOOKAHEAD - l, first = codes[p] << shift, n = 1 << shift;
            if (l <= LOOKAHEAD8) {
                int lb = codes[p] << (LOOKAHEAD8 - l);
                for (x = 0; x < (1 << (LOOKAHEAD8 - l)); x++)
                    t->lookup8[lb + x] = (l << LOOKAHEAD8) | sym;
            }
            for (x = 0; x < n; x++) {
                uint32_t e = (uint32_t)(l | s << 5 | r << 10);
                if (s == 0 || l + s <= LOOKAHEAD) {
                    int v = 0;
                    if (s) {
                        v = (x >> (shift - s)) & ((1 << s) - 1);
                        v = HUFF_EXTEND(v, s);
                    }
                    e |= COMBINED | (uint32_t)(uint16_t)(int16_t)v << 16;
                }
                t->fast[first + x] = e;
            }
        }
    }
}

/* ------------------------------------------------------------------------------------------
 * The slow path: libjpeg-turbo 2.1's jpeg_fill_bit_buffer, jpeg_huff_decode and
 * decode_mcu_slow, on this decoder's state. */

typedef struct {
    const JOCTET *next_input_byte;
    size_t bytes_in_buffer;
    uint64_t get_buffer;
    int bits_left;
} hf_reader;

static void
fill_bit_buffer(j_decompress_ptr cinfo, hf_reader *st, int nbits)
{
    const JOCTET *next = st->next_input_byte;
    size_t left = st->bytes_in_buffer;
    uint64_t buf = st->get_buffer;
    int bits = st->bits_left;

    if (cinfo->unread_marker == 0) {
        while (bits < MIN_GET_BITS) {
            int c;
            if (left == 0) {
                (*cinfo->src->fill_input_buffer)(cinfo); /* mem source: warns, fakes EOI */
                next = cinfo->src->next_input_byte;
                left = cinfo->src->bytes_in_buffer;
            }
            left--;
            c = *next++;
            if (c == 0xFF) {
                do {
                    if (left == 0) {
                        (*cinfo->src->fill_input_buffer)(cinfo);
                        next = cinfo->src->next_input_byte;
                        left = cinfo->src->bytes_in_buffer;
                    }
                    left--;
                    c = *next++;
                } while (c == 0xFF);
                if (c == 0) {
                    c = 0xFF;
                } else {
                    cinfo->unread_marker = c;
                    goto no_more_bytes;
                }
            }
            buf = (buf << 8) | (uint64_t)c;
            bits += 8;
        }
    } else {
no_more_bytes:
        if (nbits > bits) {
            struct huff_entropy_head *entropy = (struct huff_entropy_head *)cinfo->entropy;
            if (!entropy->insufficient_data) {
                WARNMS(cinfo, JWRN_HIT_MARKER);
                entropy->insufficient_data = TRUE;
            }
            buf <<= MIN_GET_BITS - bits;
            bits = MIN_GET_BITS;
        }
    }
    st->next_input_byte = next;
    st->bytes_in_buffer = left;
    st->get_buffer = buf;
    st->bits_left = bits;
}

#define S_PEEK(st, n) ((int)((st)->get_buffer >> ((st)->bits_left - (n))) & ((1 << (n)) - 1))
#define S_GET(st, n) ((int)((st)->get_buffer >> ((st)->bits_left -= (n))) & ((1 << (n)) - 1))
#define S_CHECK(cinfo, st, n) \
    do { \
        if ((st)->bits_left < (n)) \
            fill_bit_buffer(cinfo, st, n); \
    } while (0)

static int
slow_symbol(j_decompress_ptr cinfo, hf_reader *st, const hf_table *t)
{
    int l;
    int32_t code;

    if (st->bits_left < LOOKAHEAD8) {
        fill_bit_buffer(cinfo, st, 0);
        if (st->bits_left < LOOKAHEAD8) {
            l = 1;
            goto long_code;
        }
    }
    {
        int e = t->lookup8[S_PEEK(st, LOOKAHEAD8)];
        l = e >> LOOKAHEAD8;
        if (l <= LOOKAHEAD8) {
            st->bits_left -= l;
            return e & ((1 << LOOKAHEAD8) - 1);
        }
    }
long_code: /* jpeg_huff_decode, from l bits */
    S_CHECK(cinfo, st, l);
    code = S_GET(st, l);
    while (code > t->maxcode[l]) {
        code <<= 1;
        S_CHECK(cinfo, st, 1);
        code |= S_GET(st, 1);
        l++;
    }
    if (l > 16) {
        WARNMS(cinfo, JWRN_HUFF_BAD_CODE);
        return 0;
    }
    return t->huffval[(int)(code + t->valoffset[l])];
}

static void
decode_mcu_slow(j_decompress_ptr cinfo, hf_decoder *d, JBLOCKROW *MCU_data)
{
    hf_reader st;
    int blkn, dc_state[MAX_COMPS_IN_SCAN];

    st.next_input_byte = cinfo->src->next_input_byte;
    st.bytes_in_buffer = cinfo->src->bytes_in_buffer;
    st.get_buffer = d->get_buffer;
    st.bits_left = d->bits_left;
    memcpy(dc_state, d->last_dc_val, sizeof(dc_state));

    for (blkn = 0; blkn < d->blocks; blkn++) {
        JBLOCKROW block = MCU_data ? MCU_data[blkn] : NULL;
        int s, k, r;

        s = slow_symbol(cinfo, &st, d->dc[blkn]);
        if (s) {
            S_CHECK(cinfo, &st, s);
            r = S_GET(&st, s);
            s = HUFF_EXTEND(r, s);
        }
        if (d->dc_needed[blkn]) {
            int ci = d->comp[blkn];
            s = (int)((unsigned)s + (unsigned)dc_state[ci]); /* wraps as libjpeg's does */
            dc_state[ci] = s;
            if (block)
                (*block)[0] = (JCOEF)s;
        }
        for (k = 1; k < DCTSIZE2; k++) {
            s = slow_symbol(cinfo, &st, d->ac[blkn]);
            r = s >> 4;
            s &= 15;
            if (s) {
                k += r;
                S_CHECK(cinfo, &st, s);
                r = S_GET(&st, s);
                if (d->ac_needed[blkn] && block)
                    (*block)[natural_order[k]] = (JCOEF)HUFF_EXTEND(r, s);
            } else {
                if (r != 15)
                    break;
                k += 15;
            }
        }
    }
    cinfo->src->next_input_byte = st.next_input_byte;
    cinfo->src->bytes_in_buffer = st.bytes_in_buffer;
    d->get_buffer = st.get_buffer;
    d->bits_left = st.bits_left;
    memcpy(d->last_dc_val, dc_state, sizeof(dc_state));
}

/* ------------------------------------------------------------------------------------------
 * The fast path: libjpeg-turbo 2.1's decode_mcu_fast with 10-bit, value-resolving tables.
 * Returns 0 when the MCU met a marker (nothing is kept; the slow path decodes it again). */

#define GET_BYTE \
    do { \
        int c0 = *buffer++, c1 = *buffer; \
        get_buffer = (get_buffer << 8) | (uint64_t)c0; \
        bits_left += 8; \
        if (c0 == 0xFF) { \
            buffer++; \
            if (c1 != 0) { \
                cinfo->unread_marker = c1; \
                buffer -= 2; \
                get_buffer &= ~(uint64_t)0xFF; \
            } \
        } \
    } while (0)

#define FILL_FAST \
    do { \
        if (bits_left <= 16) { \
            GET_BYTE; GET_BYTE; GET_BYTE; GET_BYTE; GET_BYTE; GET_BYTE; \
        } \
    } while (0)

#define PEEK(n) ((int)(get_buffer >> (bits_left - (n))) & ((1 << (n)) - 1))
#define GET(n) ((int)(get_buffer >> (bits_left -= (n))) & ((1 << (n)) - 1))

/* A code longer than LOOKAHEAD bits (libjpeg's HUFF_DECODE_FAST overlength case; a code no
 * table holds ends at 17 bits as symbol 0, as there). */
#define LONG_SYMBOL(sym, t) \
    do { \
        int nb_ = LOOKAHEAD + 1; \
        int32_t c_ = GET(LOOKAHEAD + 1); \
        while (c_ > (t)->maxcode[nb_]) { \
            c_ = (c_ << 1) | GET(1); \
            nb_++; \
        } \
        sym = nb_ > 16 ? 0 : (t)->huffval[(int)(c_ + (t)->valoffset[nb_]) & 0xFF]; \
    } while (0)

static int
decode_mcu_fast(j_decompress_ptr cinfo, hf_decoder *d, JBLOCKROW *MCU_data)
{
    const JOCTET *buffer = cinfo->src->next_input_byte;
    uint64_t get_buffer = d->get_buffer;
    int bits_left = d->bits_left;
    int blkn, dc_state[MAX_COMPS_IN_SCAN];

    memcpy(dc_state, d->last_dc_val, sizeof(dc_state));
    for (blkn = 0; blkn < d->blocks; blkn++) {
        JBLOCKROW block = MCU_data ? MCU_data[blkn] : NULL;
        const hf_table *dc = d->dc[blkn], *ac = d->ac[blkn];
        int s, k, r, v;
        uint32_t e;

        FILL_FAST;
        e = dc->fast[PEEK(LOOKAHEAD)];
        if (e) {
            bits_left -= e & 31;
            s = (e >> 5) & 31;
            if (s) {
                FILL_FAST;
                if (e & COMBINED) {
                    bits_left -= s;
                    s = (int16_t)(e >> 16);
                } else {
                    r = GET(s);
                    s = HUFF_EXTEND(r, s);
                }
            }
        } else {
            LONG_SYMBOL(s, dc);
            if (s) {
                FILL_FAST;
                r = GET(s);
                s = HUFF_EXTEND(r, s);
            }
        }
        if (d->dc_needed[blkn]) {
            int ci = d->comp[blkn];
            s = (int)((unsigned)s + (unsigned)dc_state[ci]);
            dc_state[ci] = s;
            if (block)
                (*block)[0] = (JCOEF)s;
        }

        if (d->ac_needed[blkn] && block) {
            JCOEF *coef = *block;
            for (k = 1; k < DCTSIZE2; k++) {
                FILL_FAST;
                e = ac->fast[PEEK(LOOKAHEAD)];
                if (e) {
                    bits_left -= e & 31;
                    s = (e >> 5) & 31;
                    r = (e >> 10) & 15;
                    if (s) {
                        k += r;
                        FILL_FAST;
                        if (e & COMBINED) {
                            bits_left -= s;
                            v = (int16_t)(e >> 16);
                        } else {
                            v = GET(s);
                            v = HUFF_EXTEND(v, s);
                        }
                        coef[natural_order[k]] = (JCOEF)v;
                        continue;
                    }
                } else {
                    LONG_SYMBOL(s, ac);
                    r = s >> 4;
                    s &= 15;
                    if (s) {
                        k += r;
                        FILL_FAST;
                        v = GET(s);
                        coef[natural_order[k]] = (JCOEF)HUFF_EXTEND(v, s);
                        continue;
                    }
                }
                if (r != 15)
                    break;
                k += 15;
            }
        } else {
            for (k = 1; k < DCTSIZE2; k++) {
                FILL_FAST;
                e = ac->fast[PEEK(LOOKAHEAD)];
                if (e) {
                    bits_left -= e & 31;
                    s = (e >> 5) & 31;
                    r = (e >> 10) & 15;
                } else {
                    LONG_SYMBOL(s, ac);
                    r = s >> 4;
                    s &= 15;
                }
                if (s) {
                    k += r;
                    FILL_FAST;
                    bits_left -= s;
                } else {
                    if (r != 15)
                        break;
                    k += 15;
                }
            }
        }
    }

    if (cinfo->unread_marker != 0) {
        cinfo->unread_marker = 0;
        return 0;
    }
    cinfo->src->bytes_in_buffer -= (size_t)(buffer - cinfo->src->next_input_byte);
    cinfo->src->next_input_byte = buffer;
    d->get_buffer = get_buffer;
    d->bits_left = bits_left;
    memcpy(d->last_dc_val, dc_state, sizeof(dc_state));
    return 1;
}

static boolean
decode_mcu(j_decompress_ptr cinfo, JBLOCKROW *MCU_data)
{
    hf_decoder *d = (hf_decoder *)cinfo->entropy;

    if (!d->pub.insufficient_data) {
        if (cinfo->src->bytes_in_buffer < FAST_BYTES_PER_BLOCK * (size_t)d->blocks ||
            cinfo->unread_marker != 0 || !decode_mcu_fast(cinfo, d, MCU_data))
            decode_mcu_slow(cinfo, d, MCU_data);
    }
    return TRUE;
}

static void
start_pass(j_decompress_ptr cinfo)
{
    /* A single-scan decode starts its pass once, before this decoder is installed; any
     * other start would be a file huff_install refuses. */
    ERREXIT(cinfo, JERR_NOT_COMPILED);
}

int
huff_install(j_decompress_ptr cinfo)
{
    hf_decoder *d;
    int ci, blkn, i;

    if (cinfo->progressive_mode || cinfo->arith_code || cinfo->restart_interval != 0 ||
        cinfo->data_precision != 8 || cinfo->comps_in_scan != cinfo->num_components ||
        cinfo->comps_in_scan < 1 || cinfo->comps_in_scan > MAX_COMPS_IN_SCAN ||
        cinfo->blocks_in_MCU < 1 || cinfo->blocks_in_MCU > D_MAX_BLOCKS_IN_MCU ||
        cinfo->buffered_image || cinfo->output_scanline != 0 || cinfo->unread_marker != 0 ||
        cinfo->entropy == NULL ||
        ((struct huff_entropy_head *)cinfo->entropy)->insufficient_data)
        return 0;
    for (ci = 0; ci < cinfo->comps_in_scan; ci++) {
        jpeg_component_info *c = cinfo->cur_comp_info[ci];
        if (c->dc_tbl_no < 0 || c->dc_tbl_no >= NUM_HUFF_TBLS || c->ac_tbl_no < 0 ||
            c->ac_tbl_no >= NUM_HUFF_TBLS || cinfo->dc_huff_tbl_ptrs[c->dc_tbl_no] == NULL ||
            cinfo->ac_huff_tbl_ptrs[c->ac_tbl_no] == NULL)
            return 0;
    }
    d = (hf_decoder *)(*cinfo->mem->alloc_large)((j_common_ptr)cinfo, JPOOL_IMAGE,
                                                 sizeof(hf_decoder));
    memset(&d->pub, 0, sizeof(d->pub));
    d->pub.start_pass = start_pass;
    d->pub.decode_mcu = decode_mcu;
    d->get_buffer = 0;
    d->bits_left = 0;
    memset(d->last_dc_val, 0, sizeof(d->last_dc_val));
    for (i = 0; i < NUM_HUFF_TBLS; i++) {
        int used_dc = 0, used_ac = 0;
        for (ci = 0; ci < cinfo->comps_in_scan; ci++) {
            used_dc |= cinfo->cur_comp_info[ci]->dc_tbl_no == i;
            used_ac |= cinfo->cur_comp_info[ci]->ac_tbl_no == i;
        }
        if (used_dc)
            table_build(cinfo->dc_huff_tbl_ptrs[i], 1, &d->tables[i]);
        if (used_ac)
            table_build(cinfo->ac_huff_tbl_ptrs[i], 0, &d->tables[NUM_HUFF_TBLS + i]);
    }
    d->blocks = cinfo->blocks_in_MCU;
    for (blkn = 0; blkn < d->blocks; blkn++) {
        jpeg_component_info *c;
        ci = cinfo->MCU_membership[blkn];
        c = cinfo->cur_comp_info[ci];
        d->comp[blkn] = ci;
        d->dc[blkn] = &d->tables[c->dc_tbl_no];
        d->ac[blkn] = &d->tables[NUM_HUFF_TBLS + c->ac_tbl_no];
        d->dc_needed[blkn] = c->component_needed;
        d->ac_needed[blkn] = c->component_needed && c->DCT_scaled_size > 1;
    }
    cinfo->entropy = (struct jpeg_entropy_decoder *)d;
    return 1;
}
