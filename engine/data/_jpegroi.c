/*
 * engine.data._jpegroi -- decode only a window of a JPEG, optionally DCT-scaled, with
 * libjpeg-turbo's libjpeg API (jpeg_crop_scanline + jpeg_skip_scanlines + early abort).
 *
 * Contract (see decode_crop's docstring below): the result equals
 *     TurboJPEG().decode(src, pixel_format=TJPF_BGR, scaling_factor=(num, 8))[y0:y0+h, x0:x0+w]
 * bit for bit.  Two libjpeg details would otherwise break that at the window's edges:
 *   - jpeg_crop_scanline() aligns the left edge down to an iMCU column and makes the cropped
 *     region's first/last column the edge of the (chroma) upsampler, which then replicates
 *     the edge chroma sample instead of blending with its neighbour ("fancy" upsampling);
 *   - after jpeg_skip_scanlines() the first decoded row may lack its upper context row.
 * The first is real (up to 6 levels off at the window's left/right column with 4:2:2 or
 * 4:2:0), so the columns actually decoded are widened by a margin on the left and right
 * (when the image has pixels there) and the requested window is copied out of them.  The
 * margins are small (the left edge moves down to the previous iMCU column boundary, i.e. at
 * most one iMCU column; 2*max_h_samp_factor pixels on the right).  The second does not occur
 * with libjpeg-turbo 2.1.5: jpeg_skip_scanlines() already re-reads the line(s) the
 * upsampler needs, so rows need no margin.
 *
 * Strictness: every libjpeg error (error_exit) and every warning (emit_message with level -1,
 * e.g. "Premature end of JPEG file", "Corrupt JPEG data: ...") becomes a ValueError through
 * setjmp/longjmp; jpeg_destroy_decompress() frees everything on every path.  Nothing is ever
 * printed.  The decoder runs without the GIL; the source and destination buffers are held
 * (Py_buffer) for the whole call.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>
#include <jerror.h>

/* Largest total size of libjpeg's whole-image ("virtual") arrays, which a progressive or
 * multi-scan JPEG needs for all its coefficients (about 2 bytes x components x pixels).
 * A hostile header can claim 65535 x 65535 pixels; instead of trying to allocate (and zero)
 * many gigabytes we fail with a ValueError and let the caller fall back.  512 MiB covers any
 * real photograph up to ~90 Mpx at 4:4:4. */
#define ROI_MAX_VIRT_MEMORY (512L * 1024L * 1024L)

/* Lines asked of jpeg_read_scanlines() per call. */
#define ROI_ROWS_PER_CALL 16

#ifndef JCS_EXTENSIONS
#error "engine.data._jpegroi needs libjpeg-turbo (JCS_EXT_BGR)"
#endif

typedef struct {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    char message[JMSG_LENGTH_MAX];
} roi_error_mgr;

static void
roi_error_exit(j_common_ptr cinfo)
{
    roi_error_mgr *err = (roi_error_mgr *)cinfo->err;
    if (cinfo->err->msg_code == JERR_NO_BACKING_STORE) /* ROI_MAX_VIRT_MEMORY exceeded */
        snprintf(err->message, sizeof(err->message),
                 "image too large: its coefficient buffers exceed %ld MiB",
                 ROI_MAX_VIRT_MEMORY >> 20);
    else
        (*cinfo->err->format_message)(cinfo, err->message);
    longjmp(err->jump, 1);
}

static void
roi_emit_message(j_common_ptr cinfo, int msg_level)
{
    roi_error_mgr *err = (roi_error_mgr *)cinfo->err;
    if (msg_level < 0) {
        /* A warning means corrupt or truncated data: be strict, never return gray rows. */
        (*cinfo->err->format_message)(cinfo, err->message);
        longjmp(err->jump, 1);
    }
    /* trace messages (msg_level >= 0) are ignored */
}

static void
roi_output_message(j_common_ptr cinfo)
{
    (void)cinfo; /* never print to stderr */
}

enum {
    ROI_OK = 0,
    ROI_LIBJPEG = 1,     /* libjpeg error or warning: message in err.message */
    ROI_COLORSPACE = 2,  /* CMYK, YCCK or unknown component layout */
    ROI_WINDOW = 3,      /* window outside the scaled image */
    ROI_SHORT = 4,       /* libjpeg returned fewer lines than asked (should not happen) */
};

/* decode_crop's `stop` (for timing the decoder's stages one at a time, on the same window):
 * where roi_decode returns early; dst is then left unspecified.  ROI_STOP_NONE is the whole
 * decode, the only one the loader uses. */
enum {
    ROI_STOP_NONE = 0,
    ROI_STOP_SETUP = 1,   /* after jpeg_read_header + jpeg_start_decompress + crop setup */
    ROI_STOP_ENTROPY = 2, /* after skipping (entropy-decoding) every row down to the window's last */
    ROI_STOP_NOCOLOR = 3, /* the whole window, its colour conversion replaced by nothing */
    ROI_STOP_MAX = 3,
};

/* The public head of libjpeg's colour deconverter (jpegint.h, not installed everywhere): the
 * same two methods since libjpeg 6.  ROI_STOP_NOCOLOR swaps color_convert for a no-op. */
struct roi_color_deconverter {
    void (*start_pass)(j_decompress_ptr cinfo);
    void (*color_convert)(j_decompress_ptr cinfo, JSAMPIMAGE input_buf, JDIMENSION input_row,
                          JSAMPARRAY output_buf, int num_rows);
};

static void
roi_no_color_convert(j_decompress_ptr cinfo, JSAMPIMAGE input_buf, JDIMENSION input_row,
                     JSAMPARRAY output_buf, int num_rows)
{
    (void)cinfo, (void)input_buf, (void)input_row, (void)output_buf, (void)num_rows;
}

typedef struct {
    /* in */
    const unsigned char *src;
    unsigned long src_len;
    int scale_num;
    int fast_dct; /* JDCT_IFAST (TurboJPEG's TJFLAG_FASTDCT) instead of JDCT_ISLOW */
    int stop;     /* one of ROI_STOP_* */
    int seek;     /* may decode a sub-image cut out at restart markers (roi_seek_build) */
    JDIMENSION x0, y0, w, h;
    unsigned char *dst;    /* h * w * 3 bytes, or NULL for a header-only call */
    /* out */
    JDIMENSION width, height;     /* image size at scale 1 */
    JDIMENSION out_width, out_height; /* scaled size */
    int subsamp, colorspace;      /* validate(): TurboJPEG's TJSAMP_* and TJCS_* */
    char message[JMSG_LENGTH_MAX];
} roi_job;

static void
roi_init(struct jpeg_decompress_struct *cinfo, roi_error_mgr *err)
{
    memset(cinfo, 0, sizeof(*cinfo));
    memset(err, 0, sizeof(*err));
    cinfo->err = jpeg_std_error(&err->pub);
    err->pub.error_exit = roi_error_exit;
    err->pub.emit_message = roi_emit_message;
    err->pub.output_message = roi_output_message;
}

static int
colorspace_supported(const struct jpeg_decompress_struct *cinfo)
{
    switch (cinfo->jpeg_color_space) {
    case JCS_GRAYSCALE:
        return cinfo->num_components == 1;
    case JCS_YCbCr:
    case JCS_RGB:
        return cinfo->num_components == 3;
    default:
        return 0; /* JCS_CMYK, JCS_YCCK, JCS_UNKNOWN */
    }
}

/* Runs without the GIL.  Decodes job->src as it is.  Returns one of ROI_*. */
static int
roi_decode_whole(roi_job *job)
{
    struct jpeg_decompress_struct cinfo;
    roi_error_mgr err;
    JDIMENSION W, H, cx, cw, skip, row, xoff_in_crop;
    JDIMENSION x_end, margin_right;
    JSAMPARRAY scratch = NULL;
    JSAMPROW rows[ROI_ROWS_PER_CALL], scratch_rows[ROI_ROWS_PER_CALL];
    JDIMENSION i;
    size_t dst_stride;
    int direct;

    roi_init(&cinfo, &err);
    if (setjmp(err.jump)) {
        /* Only cinfo's heap state is touched after setjmp; no local needs to be volatile. */
        memcpy(job->message, err.message, sizeof(job->message));
        jpeg_destroy_decompress(&cinfo);
        return ROI_LIBJPEG;
    }
    jpeg_create_decompress(&cinfo);
    cinfo.mem->max_memory_to_use = ROI_MAX_VIRT_MEMORY;
    jpeg_mem_src(&cinfo, job->src, job->src_len);
    jpeg_read_header(&cinfo, TRUE);
    job->width = cinfo.image_width;
    job->height = cinfo.image_height;
    if (job->dst == NULL) { /* header() */
        jpeg_destroy_decompress(&cinfo);
        return ROI_OK;
    }
    if (!colorspace_supported(&cinfo)) {
        jpeg_destroy_decompress(&cinfo);
        return ROI_COLORSPACE;
    }

    /* The same settings TurboJPEG's tjDecompress2() uses with flags=0. */
    cinfo.out_color_space = JCS_EXT_BGR;
    cinfo.scale_num = (unsigned int)job->scale_num;
    cinfo.scale_denom = 8;
    cinfo.dct_method = job->fast_dct ? JDCT_IFAST : JDCT_ISLOW;
    cinfo.do_fancy_upsampling = TRUE;
    cinfo.quantize_colors = FALSE;
    jpeg_calc_output_dimensions(&cinfo);
    W = cinfo.output_width;
    H = cinfo.output_height;
    job->out_width = W;
    job->out_height = H;
    if (job->w == 0 || job->h == 0 || job->x0 >= W || job->y0 >= H ||
        job->w > W - job->x0 || job->h > H - job->y0) {
        jpeg_destroy_decompress(&cinfo);
        return ROI_WINDOW;
    }

    /* Columns to decode: one pixel of margin on the left (jpeg_crop_scanline then aligns the
     * start down to an iMCU column, so the upsampler's artificial left edge falls outside the
     * window) and 2*max_h_samp_factor pixels on the right (the last chroma sample used by the
     * window must not be the cropped region's last one). */
    cx = job->x0 > 0 ? job->x0 - 1 : 0;
    margin_right = 2 * (JDIMENSION)cinfo.max_h_samp_factor;
    x_end = (W - (job->x0 + job->w) > margin_right) ? job->x0 + job->w + margin_right : W;

    jpeg_start_decompress(&cinfo);
    if (cinfo.output_components != 3) {
        jpeg_destroy_decompress(&cinfo);
        return ROI_COLORSPACE;
    }
    if (job->stop == ROI_STOP_NOCOLOR) /* jpeg_skip_scanlines saves and restores it */
        ((struct roi_color_deconverter *)cinfo.cconvert)->color_convert = roi_no_color_convert;
    cw = x_end - cx;
    if (cx > 0 || cw < W)
        jpeg_crop_scanline(&cinfo, &cx, &cw); /* cx aligned down, cw grown to match */
    xoff_in_crop = job->x0 - cx;
    if (job->stop == ROI_STOP_SETUP) {
        jpeg_destroy_decompress(&cinfo);
        return ROI_OK;
    }
    if (job->stop == ROI_STOP_ENTROPY) {
        /* Skip to the window's last row, then read it: skipping to the image's end would
         * decode nothing at all (libjpeg just marks the input finished). */
        JSAMPARRAY last = (*cinfo.mem->alloc_sarray)((j_common_ptr)&cinfo, JPOOL_IMAGE,
                                                     cinfo.output_width * 3, 1);
        skip = job->y0 + job->h - 1;
        if ((skip > 0 && jpeg_skip_scanlines(&cinfo, skip) != skip) ||
            jpeg_read_scanlines(&cinfo, last, 1) != 1) {
            jpeg_destroy_decompress(&cinfo);
            return ROI_SHORT;
        }
        jpeg_destroy_decompress(&cinfo);
        return ROI_OK;
    }

    /* Rows: jpeg_skip_scanlines() skips whole iMCU rows with entropy decoding only, and
     * itself reads (and drops) the last lines before y0 when the upsampler needs context
     * rows, so the lines from y0 on equal a full decode's (checked exhaustively by
     * tests/test_jpegroi.py for every subsampling and scale). */
    skip = job->y0;
    if (skip > 0 && jpeg_skip_scanlines(&cinfo, skip) != skip) {
        jpeg_destroy_decompress(&cinfo);
        return ROI_SHORT;
    }

    /* Read up to ROI_ROWS_PER_CALL lines per jpeg_read_scanlines() call (one line per call
     * costs ~15% on a full-width decode).  When the decoded columns are exactly the window's,
     * the lines go straight into dst; otherwise into scratch rows, then the window's columns
     * are copied out.  Scratch memory belongs to libjpeg's image pool (freed by destroy). */
    dst_stride = (size_t)job->w * 3;
    direct = (xoff_in_crop == 0 && cinfo.output_width == job->w);
    if (!direct) {
        /* Scratch rows deliberately start 1 byte past a 32-byte boundary: libjpeg-turbo's
         * SIMD colour converters use non-temporal (cache-bypassing) stores for 32-byte-aligned
         * output rows, and reading such rows straight back for the copy below costs ~10x
         * the copy itself (measured: -13% throughput on 500x375 photos). */
        size_t stride = ((size_t)cinfo.output_width * 3 + 64) & ~(size_t)31;
        JSAMPLE *base = (JSAMPLE *)(*cinfo.mem->alloc_large)(
            (j_common_ptr)&cinfo, JPOOL_IMAGE, stride * ROI_ROWS_PER_CALL + 64);
        base += 32 - ((size_t)base & 31) + 1;
        scratch = scratch_rows;
        for (i = 0; i < ROI_ROWS_PER_CALL; i++)
            scratch[i] = base + i * stride;
    }
    row = 0;
    while (row < job->h) {
        JDIMENSION want = job->h - row, got;
        if (want > ROI_ROWS_PER_CALL)
            want = ROI_ROWS_PER_CALL;
        if (direct) {
            for (i = 0; i < want; i++)
                rows[i] = job->dst + (size_t)(row + i) * dst_stride;
            got = jpeg_read_scanlines(&cinfo, rows, want);
        } else {
            got = jpeg_read_scanlines(&cinfo, scratch, want);
            for (i = 0; i < got; i++)
                memcpy(job->dst + (size_t)(row + i) * dst_stride,
                       scratch[i] + (size_t)xoff_in_crop * 3, dst_stride);
        }
        if (got == 0 || got > want) {
            jpeg_destroy_decompress(&cinfo);
            return ROI_SHORT;
        }
        row += got;
    }

    /* Stop here: the rows below the window are never decoded (jpeg_destroy aborts). */
    jpeg_destroy_decompress(&cinfo);
    return ROI_OK;
}


/* ---------------------------------------------------------------------------------------
 * Seeking with restart markers.
 *
 * Huffman-coded data is one bit stream, so without restart markers every MCU above a window,
 * and every MCU left and right of it, is entropy-decoded to reach the window's own.  After a
 * restart marker the stream starts afresh (byte-aligned, DC predictions reset), so a JPEG
 * with a marker every K MCUs, K dividing the MCUs per row, is a grid of independent pieces.
 * The pieces covering a window plus a margin, copied behind the file's own headers with the
 * frame's size changed and the markers renumbered, form a valid JPEG of just that region: its
 * decode equals the whole image's decode there, except within reach of its artificial edges,
 * where the chroma upsampler replicates instead of blending with samples that are not there.
 * That reach is one chroma sample (max_samp_factor output pixels); the margin is two.
 * tests/test_restarts.py checks the equality for every layout, scale and many windows.
 * add_restarts() writes such files (a marker after every MCU); any other JPEG whose restart
 * interval divides its MCU row seeks too.  Whatever does not fit (progressive, several
 * scans, DNL, a marker out of sequence) takes the whole-image path, which also has the last
 * word whenever the sub-image's decode fails.
 * --------------------------------------------------------------------------------------- */
typedef struct {
    unsigned long sof;   /* offset of the SOF marker */
    unsigned long scan;  /* offset of the first byte of entropy-coded data */
    unsigned int K;      /* restart interval, MCUs */
    unsigned int X, Y;   /* frame size */
    unsigned int mcu_w, mcu_h, cols, rows;
    unsigned int hmax, vmax;
} roi_layout;

static unsigned int
be16(const unsigned char *p)
{
    return ((unsigned int)p[0] << 8) | p[1];
}

/* 1 where src is a one-scan Huffman sequential JPEG (all components interleaved, or one)
 * with a restart interval dividing the MCU row; then *L describes it. */
static int
roi_seek_layout(const unsigned char *s, unsigned long n, roi_layout *L)
{
    unsigned long pos = 2, len;
    unsigned int m, nf = 0, i;
    int have_sof = 0;

    memset(L, 0, sizeof(*L));
    if (n < 4 || s[0] != 0xFF || s[1] != 0xD8)
        return 0;
    for (;;) {
        if (pos + 4 > n || s[pos] != 0xFF)
            return 0;
        m = s[pos + 1];
        if (m == 0xFF) { /* fill byte */
            pos++;
            continue;
        }
        if (m == 0x01 || (m >= 0xD0 && m <= 0xD9))
            return 0; /* no standalone marker belongs before the scan */
        len = be16(s + pos + 2);
        if (len < 2 || pos + 2 + len > n)
            return 0;
        if (m == 0xC0 || m == 0xC1) {
            const unsigned char *seg = s + pos + 4;
            if (have_sof || len < 8 || seg[0] != 8)
                return 0;
            L->sof = pos;
            L->Y = be16(seg + 1);
            L->X = be16(seg + 3);
            nf = seg[5];
            if (L->X == 0 || L->Y == 0 || (nf != 1 && nf != 3) || len < 8 + 3 * nf)
                return 0;
            for (i = 0; i < nf; i++) {
                unsigned int hv = seg[6 + 3 * i + 1], h = hv >> 4, v = hv & 15;
                if (h < 1 || h > 4 || v < 1 || v > 4)
                    return 0;
                if (h > L->hmax)
                    L->hmax = h;
                if (v > L->vmax)
                    L->vmax = v;
            }
            have_sof = 1;
        } else if ((m >= 0xC2 && m <= 0xCF) && m != 0xC4 && m != 0xC8 && m != 0xCC) {
            return 0; /* progressive, lossless, arithmetic-coded or hierarchical */
        } else if (m == 0xDD) {
            if (len < 4)
                return 0;
            L->K = be16(s + pos + 4);
        } else if (m == 0xDA) {
            if (!have_sof || len < 3 || s[pos + 4] != nf)
                return 0;
            L->scan = pos + 2 + len;
            break;
        }
        pos += 2 + len;
    }
    if (nf == 1) { /* a one-component scan is not interleaved: its MCU is one block */
        L->mcu_w = L->mcu_h = 8;
    } else {
        L->mcu_w = 8 * L->hmax;
        L->mcu_h = 8 * L->vmax;
    }
    L->cols = (L->X + L->mcu_w - 1) / L->mcu_w;
    L->rows = (L->Y + L->mcu_h - 1) / L->mcu_h;
    return L->K != 0 && L->K <= L->cols && L->cols % L->K == 0;
}

/* Build the sub-image of job's window (scaled coordinates) into a malloc'ed buffer; returns
 * 1 with *sub, *sub_len and the window's offset in it (scaled pixels), or 0 where seeking
 * does not apply or would not save anything. */
static int
roi_seek_build(const roi_job *job, unsigned char **sub, unsigned long *sub_len,
               JDIMENSION *dx, JDIMENSION *dy)
{
    const unsigned char *s = job->src;
    unsigned long n = job->src_len, p, need, i, first, last, count, j;
    unsigned long *mark = NULL, start;
    unsigned char *out, *o;
    roi_layout L;
    unsigned int num = (unsigned int)job->scale_num, mw, mh, mx, my, W, H;
    unsigned int c0, c1, r0, r1, r, sub_w, sub_h, per_row;

    *sub = NULL;
    if (!roi_seek_layout(s, n, &L))
        return 0;
    mw = L.mcu_w * num / 8;
    mh = L.mcu_h * num / 8;
    W = (L.X * num + 7) / 8;
    H = (L.Y * num + 7) / 8;
    if (job->x0 >= W || job->y0 >= H || job->w > W - job->x0 || job->h > H - job->y0)
        return 0; /* the whole-image path reports the bad window */
    mx = 2 * L.hmax;
    my = 2 * L.vmax;
    c0 = job->x0 > mx ? (job->x0 - mx) / mw : 0;
    c0 -= c0 % L.K;
    c1 = (job->x0 + job->w + mx + mw - 1) / mw;
    c1 = ((c1 + L.K - 1) / L.K) * L.K; /* cols is a multiple of K, so the cap keeps that */
    if (c1 > L.cols)
        c1 = L.cols;
    r0 = job->y0 > my ? (job->y0 - my) / mh : 0;
    r1 = (job->y0 + job->h + my + mh - 1) / mh;
    if (r1 > L.rows)
        r1 = L.rows;
    if (c0 == 0 && c1 == L.cols && r0 == 0)
        return 0; /* the whole-image path already stops after the window's last row */
    per_row = (c1 - c0) / L.K;
    count = (unsigned long)per_row * (r1 - r0);
    /* The markers that end every interval up to the last one the window needs. */
    need = ((unsigned long)(r1 - 1) * L.cols + c1) / L.K; /* intervals 0..need-1 */
    mark = (unsigned long *)malloc(need * sizeof(unsigned long));
    if (mark == NULL)
        return 0;
    p = L.scan;
    for (i = 0; i < need;) {
        const unsigned char *q = (const unsigned char *)memchr(s + p, 0xFF, n - p);
        unsigned int b;
        if (q == NULL || (unsigned long)(q - s) + 1 >= n)
            goto no;
        p = (unsigned long)(q - s);
        b = s[p + 1];
        if (b == 0x00) { /* a stuffed 0xFF data byte */
            p += 2;
        } else if (b == 0xFF) {
            p += 1;
        } else if (b >= 0xD0 && b <= 0xD7) {
            if (b != 0xD0 + (i & 7))
                goto no;
            mark[i++] = p;
            p += 2;
        } else if (b == 0xD9 && i + 1 == need) {
            mark[i++] = p;
        } else {
            goto no;
        }
    }
    out = (unsigned char *)malloc(L.scan + (mark[need - 1] - L.scan) + 2 * count + 2);
    if (out == NULL)
        goto no;
    memcpy(out, s, L.scan);
    sub_w = c1 == L.cols ? L.X - c0 * L.mcu_w : (c1 - c0) * L.mcu_w;
    sub_h = r1 == L.rows ? L.Y - r0 * L.mcu_h : (r1 - r0) * L.mcu_h;
    out[L.sof + 5] = (unsigned char)(sub_h >> 8);
    out[L.sof + 6] = (unsigned char)sub_h;
    out[L.sof + 7] = (unsigned char)(sub_w >> 8);
    out[L.sof + 8] = (unsigned char)sub_w;
    o = out + L.scan;
    j = 0;
    for (r = r0; r < r1; r++) {
        first = ((unsigned long)r * L.cols + c0) / L.K;
        last = first + per_row; /* one past */
        start = first == 0 ? L.scan : mark[first - 1] + 2;
        /* The row's intervals are contiguous in the file: copy them, markers and all, then
         * renumber the markers in the copy. */
        memcpy(o, s + start, mark[last - 1] - start);
        for (i = first; i + 1 < last; i++)
            o[mark[i] - start + 1] = (unsigned char)(0xD0 + ((j + i - first) & 7));
        o += mark[last - 1] - start;
        j += per_row;
        if (j < count) {
            *o++ = 0xFF;
            *o++ = (unsigned char)(0xD0 + ((j - 1) & 7));
        }
    }
    *o++ = 0xFF;
    *o++ = 0xD9;
    free(mark);
    *sub = out;
    *sub_len = (unsigned long)(o - out);
    *dx = c0 * mw;
    *dy = r0 * mh;
    return 1;
no:
    free(mark);
    return 0;
}

/* Runs without the GIL.  Returns one of ROI_*. */
static int
roi_decode(roi_job *job)
{
    if (job->seek && job->dst != NULL) {
        unsigned char *sub;
        unsigned long sub_len;
        JDIMENSION dx, dy;
        if (roi_seek_build(job, &sub, &sub_len, &dx, &dy)) {
            roi_job part = *job;
            int status;
            part.src = sub;
            part.src_len = sub_len;
            part.x0 -= dx;
            part.y0 -= dy;
            status = roi_decode_whole(&part);
            free(sub);
            if (status == ROI_OK)
                return ROI_OK;
        }
    }
    return roi_decode_whole(job);
}

static PyObject *
roi_raise(roi_job *job, int status)
{
    switch (status) {
    case ROI_LIBJPEG:
        PyErr_SetString(PyExc_ValueError, job->message);
        break;
    case ROI_COLORSPACE:
        PyErr_SetString(PyExc_ValueError,
                        "unsupported colour space (only grayscale, YCbCr and RGB JPEGs; "
                        "CMYK/YCCK are not)");
        break;
    case ROI_WINDOW:
        PyErr_Format(PyExc_ValueError,
                     "window x0=%u y0=%u w=%u h=%u is not inside the %ux%u image "
                     "(%ux%u scaled by the DCT)",
                     (unsigned)job->x0, (unsigned)job->y0, (unsigned)job->w, (unsigned)job->h,
                     (unsigned)job->out_width, (unsigned)job->out_height,
                     (unsigned)job->width, (unsigned)job->height);
        break;
    default:
        PyErr_SetString(PyExc_ValueError, "libjpeg returned fewer scanlines than expected");
        break;
    }
    return NULL;
}

static int
to_jdim(Py_ssize_t v, const char *name, JDIMENSION *out)
{
    if (v < 0 || v > (Py_ssize_t)JPEG_MAX_DIMENSION) {
        PyErr_Format(PyExc_ValueError, "%s=%zd is out of range", name, v);
        return -1;
    }
    *out = (JDIMENSION)v;
    return 0;
}

/* job's source: a held buffer, read in place.  0, or -1 with a ValueError set for a buffer
 * longer than libjpeg's unsigned long lengths can describe. */
static int
roi_set_src(roi_job *job, const Py_buffer *src)
{
    if ((unsigned long long)src->len > (unsigned long long)(unsigned long)-1) {
        PyErr_SetString(PyExc_ValueError, "src is too large");
        return -1;
    }
    job->src = (const unsigned char *)src->buf;
    job->src_len = (unsigned long)src->len;
    return 0;
}

PyDoc_STRVAR(decode_crop_doc,
"decode_crop(src, scale_num, x0, y0, w, h, dst, fast_dct=False, stop=0, seek=True) -> None\n"
"\n"
"Decode the window rows y0..y0+h-1, columns x0..x0+w-1 of the JPEG `src` (any bytes-like\n"
"object, read in place) scaled by scale_num/8 (1..8; scaled size W' = ceil(W*num/8),\n"
"H' = ceil(H*num/8), as jpeg_calc_output_dimensions gives) into `dst`, a writable\n"
"C-contiguous buffer of exactly h*w*3 bytes (e.g. numpy uint8 (h, w, 3)), as BGR.\n"
"The result equals TurboJPEG().decode(src, pixel_format=TJPF_BGR,\n"
"scaling_factor=(scale_num, 8) reduced, e.g. (1, 2))[y0:y0+h, x0:x0+w] bit for bit\n"
"(with fast_dct, the same decode with flags=TJFLAG_FASTDCT: the faster, slightly less\n"
"accurate integer IDCT).\n"
"Only the rows down to y0+h-1 are decoded, rows above y0 only entropy-decoded (baseline),\n"
"and the IDCT/colour conversion runs only on the iMCU columns of the window.\n"
"Grayscale, YCbCr and RGB JPEGs, baseline or progressive, any subsampling.\n"
"Raises ValueError for: a window outside the scaled image, a wrong dst size, scale_num\n"
"outside 1..8, CMYK/YCCK ('unsupported colour space'), and any libjpeg error or warning\n"
"(corrupt or truncated data).  The GIL is released while decoding.\n"
"Speed note (libjpeg-turbo 2.1): scales 3/8, 5/8, 6/8 and 7/8 use non-SIMD IDCTs and decode\n"
"slower than 8/8; prefer scale_num in (1, 2, 4, 8).\n"
"stop (for timing the decoder's stages on the same window; dst is then unspecified):\n"
"1 returns after the header and the decoder's setup, 2 after entropy-decoding the rows down\n"
"to the window's last (jpeg_skip_scanlines, then that last row is decoded in full),\n"
"3 decodes the window without its colour conversion; 0, the default, is the decode above.\n"
"seek: in a JPEG with restart markers whose interval divides its MCU row (add_restarts),\n"
"decode only the pieces between markers that cover the window and a margin, cut out as a\n"
"JPEG of that region (the same pixels); False decodes from the image's start as above.");

static PyObject *
decode_crop(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"src", "scale_num", "x0", "y0", "w", "h", "dst", "fast_dct",
                             "stop", "seek", NULL};
    Py_buffer src, dst;
    int scale_num, status, fast_dct = 0, stop = ROI_STOP_NONE, seek = 1;
    Py_ssize_t x0, y0, w, h;
    roi_job job;
    (void)self;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*innnnw*|pip:decode_crop", kwlist, &src,
                                     &scale_num, &x0, &y0, &w, &h, &dst, &fast_dct, &stop,
                                     &seek))
        return NULL;
    memset(&job, 0, sizeof(job));
    if (stop < ROI_STOP_NONE || stop > ROI_STOP_MAX) {
        PyErr_Format(PyExc_ValueError, "stop must be in 0..%d, got %d", ROI_STOP_MAX, stop);
        goto fail;
    }
    job.stop = stop;
    job.seek = seek;
    if (scale_num < 1 || scale_num > 8) {
        PyErr_Format(PyExc_ValueError, "scale_num must be in 1..8, got %d", scale_num);
        goto fail;
    }
    if (to_jdim(x0, "x0", &job.x0) || to_jdim(y0, "y0", &job.y0) || to_jdim(w, "w", &job.w) ||
        to_jdim(h, "h", &job.h))
        goto fail;
    if (w == 0 || h == 0) {
        PyErr_Format(PyExc_ValueError, "empty window w=%zd h=%zd", w, h);
        goto fail;
    }
    if (dst.len != w * h * 3) {
        PyErr_Format(PyExc_ValueError, "dst has %zd bytes, the window needs h*w*3 = %zd",
                     dst.len, w * h * 3);
        goto fail;
    }
    if (roi_set_src(&job, &src) < 0)
        goto fail;
    job.scale_num = scale_num;
    job.fast_dct = fast_dct;
    job.dst = (unsigned char *)dst.buf;

    Py_BEGIN_ALLOW_THREADS
    status = roi_decode(&job);
    Py_END_ALLOW_THREADS

    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    if (status != ROI_OK)
        return roi_raise(&job, status);
    Py_RETURN_NONE;

fail:
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return NULL;
}

PyDoc_STRVAR(header_doc,
"header(src) -> (width, height)\n"
"\n"
"Image size at scale 1 from the JPEG header only (jpeg_read_header; no pixel is decoded).\n"
"Works for any colour space (CMYK too); raises ValueError on a corrupt or truncated\n"
"header (libjpeg's message).");

static PyObject *
header(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"src", NULL};
    Py_buffer src;
    roi_job job;
    int status;
    (void)self;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*:header", kwlist, &src))
        return NULL;
    memset(&job, 0, sizeof(job));
    if (roi_set_src(&job, &src) < 0) {
        PyBuffer_Release(&src);
        return NULL;
    }
    job.scale_num = 8;
    job.dst = NULL;
    Py_BEGIN_ALLOW_THREADS
    status = roi_decode(&job);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&src);
    if (status != ROI_OK)
        return roi_raise(&job, status);
    return Py_BuildValue("(II)", (unsigned int)job.width, (unsigned int)job.height);
}

/* TurboJPEG's chroma subsampling class of a 1- or 3-component header (TJSAMP_444 = 0, 422,
 * 420, GRAY, 440, 411 = 5), or -1 where TurboJPEG's getSubsamp() (turbojpeg.c, libjpeg-turbo
 * 2.1) finds none: tjDecompressHeader3() then refuses the file ("Could not determine
 * subsampling type"), so every TurboJPEG decode does, and validate() must refuse it too, even
 * though libjpeg itself would decode it.  The same rules, for the layouts validate() handles
 * (CMYK/YCCK never get here): grayscale; the six classes by the luma factors with chroma at
 * 1x1; 4:2:2 and 4:4:0 written as luma 2x2 with chroma 1x2 or 2x1; 4:4:4 written with every
 * component at the same factors, at most 3 blocks each. */
static int
roi_subsamp(const struct jpeg_decompress_struct *cinfo)
{
    static const int mcu_w[6] = {8, 16, 16, 8, 8, 32}, mcu_h[6] = {8, 8, 16, 8, 16, 8};
    const jpeg_component_info *c = cinfo->comp_info;
    int i, k, h0, v0, match;

    if (cinfo->num_components == 1 && cinfo->jpeg_color_space == JCS_GRAYSCALE)
        return 3; /* TJSAMP_GRAY */
    if (cinfo->num_components != 3)
        return -1;
    h0 = c[0].h_samp_factor;
    v0 = c[0].v_samp_factor;
    for (i = 0; i < 6; i++) {
        if (i == 3) /* TJSAMP_GRAY: one component only */
            continue;
        if (h0 == mcu_w[i] / 8 && v0 == mcu_h[i] / 8) {
            for (match = 0, k = 1; k < 3; k++)
                match += c[k].h_samp_factor == 1 && c[k].v_samp_factor == 1;
            if (match == 2)
                return i;
        }
        if (h0 == 2 && v0 == 2 && (i == 1 || i == 4)) {
            for (match = 0, k = 1; k < 3; k++)
                match += c[k].h_samp_factor == mcu_h[i] / 8 && c[k].v_samp_factor == mcu_w[i] / 8;
            if (match == 2)
                return i;
        }
        if (i == 0 && h0 * v0 <= D_MAX_BLOCKS_IN_MCU / 3) {
            for (match = 0, k = 1; k < 3; k++)
                match += c[k].h_samp_factor == h0 && c[k].v_samp_factor == v0;
            if (match == 2)
                return i;
        }
    }
    return -1;
}

/* Runs without the GIL.  The steps of TurboJPEG's tjDecompress2() (read the header, start,
 * read every scanline, finish: the last step reads the data after the final scan up to EOI) at
 * scale scale_num/8, into one reused strip of rows.  Returns one of ROI_*. */
static int
roi_validate(roi_job *job)
{
    struct jpeg_decompress_struct cinfo;
    roi_error_mgr err;
    JSAMPARRAY strip;

    roi_init(&cinfo, &err);
    if (setjmp(err.jump)) {
        memcpy(job->message, err.message, sizeof(job->message));
        jpeg_destroy_decompress(&cinfo);
        return ROI_LIBJPEG;
    }
    jpeg_create_decompress(&cinfo);
    /* No max_memory_to_use here: TurboJPEG sets none, and validation must accept exactly
     * what its decode accepts. */
    jpeg_mem_src(&cinfo, job->src, job->src_len);
    jpeg_read_header(&cinfo, TRUE);
    job->width = cinfo.image_width;
    job->height = cinfo.image_height;
    job->subsamp = roi_subsamp(&cinfo);
    /* TJCS_RGB = 0, TJCS_YCbCr = 1, TJCS_GRAY = 2 (turbojpeg.h) */
    job->colorspace = cinfo.jpeg_color_space == JCS_RGB ? 0 :
                      cinfo.jpeg_color_space == JCS_YCbCr ? 1 : 2;
    if (!colorspace_supported(&cinfo) || job->subsamp < 0) {
        jpeg_destroy_decompress(&cinfo);
        return ROI_COLORSPACE;
    }
    cinfo.out_color_space = JCS_EXT_BGR;
    cinfo.scale_num = (unsigned int)job->scale_num;
    cinfo.scale_denom = 8;
    jpeg_start_decompress(&cinfo);
    strip = (*cinfo.mem->alloc_sarray)((j_common_ptr)&cinfo, JPOOL_IMAGE,
                                       cinfo.output_width * cinfo.output_components,
                                       ROI_ROWS_PER_CALL);
    while (cinfo.output_scanline < cinfo.output_height) {
        if (jpeg_read_scanlines(&cinfo, strip, ROI_ROWS_PER_CALL) == 0) {
            jpeg_destroy_decompress(&cinfo);
            return ROI_SHORT;
        }
    }
    jpeg_finish_decompress(&cinfo);
    jpeg_destroy_decompress(&cinfo);
    return ROI_OK;
}

PyDoc_STRVAR(validate_doc,
"validate(src, scale_num=1) -> (width, height, subsampling, colorspace)\n"
"\n"
"Decode the whole JPEG `src` at scale scale_num/8 (1..8), discarding the pixels, and return\n"
"its size at scale 1 and the header's TurboJPEG subsampling (TJSAMP_*) and colour space\n"
"(TJCS_RGB, TJCS_YCbCr or TJCS_GRAY): what tjDecompressHeader3() reports.  Raises ValueError\n"
"exactly where\n"
"TurboJPEG().decode(src, pixel_format=TJPF_BGR, scaling_factor=(scale_num, 8),\n"
"flags=TJFLAG_STOPONWARNING) fails or warns: every libjpeg error and warning, including\n"
"those about data after the last scan, since the decode runs to the end-of-image marker.\n"
"Also for CMYK/YCCK and for component layouts TurboJPEG's header probe refuses (its\n"
"'Could not determine subsampling type'), both as 'unsupported colour space'.  The GIL is\n"
"released while decoding.");

static PyObject *
validate(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"src", "scale_num", NULL};
    Py_buffer src;
    roi_job job;
    int status, scale_num = 1;
    (void)self;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*|i:validate", kwlist, &src, &scale_num))
        return NULL;
    if (scale_num < 1 || scale_num > 8) {
        PyBuffer_Release(&src);
        PyErr_Format(PyExc_ValueError, "scale_num must be in 1..8, got %d", scale_num);
        return NULL;
    }
    memset(&job, 0, sizeof(job));
    if (roi_set_src(&job, &src) < 0) {
        PyBuffer_Release(&src);
        return NULL;
    }
    job.scale_num = scale_num;
    Py_BEGIN_ALLOW_THREADS
    status = roi_validate(&job);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&src);
    if (status != ROI_OK)
        return roi_raise(&job, status);
    return Py_BuildValue("(IIii)", (unsigned int)job.width, (unsigned int)job.height,
                         job.subsamp, job.colorspace);
}


/* ---------------------------------------------------------------------------------------
 * Restart markers: a lossless rewrite of a JPEG that lets a decoder start at any MCU.
 *
 * add_restarts() re-encodes a baseline or extended sequential Huffman JPEG's quantised DCT
 * coefficients unchanged (jpeg_read_coefficients -> jpeg_write_coefficients, as jpegtran
 * does) with a restart marker after every `interval` MCUs and optimised Huffman tables.
 * Decoding the result gives the same pixels as decoding the source: the coefficients, the
 * quantisation tables, the sampling factors and the colour space (written as a JFIF or an
 * Adobe marker) are the source's; Huffman tables and restart markers only change how the
 * same numbers are spelled.  Progressive and arithmetic-coded files are left alone (None):
 * a progressive file's decoder smooths blocks whose low coefficients a scan left unrefined,
 * which a sequential one would not.
 * --------------------------------------------------------------------------------------- */
static int
roi_add_restarts(roi_job *job, unsigned int interval, unsigned char **out,
                 unsigned long *out_len)
{
    struct jpeg_decompress_struct dinfo;
    struct jpeg_compress_struct cinfo;
    roi_error_mgr err;
    jvirt_barray_ptr *coefs;
    int have_c = 0;

    roi_init(&dinfo, &err);
    memset(&cinfo, 0, sizeof(cinfo));
    cinfo.err = &err.pub; /* one error manager: either struct's error ends both */
    *out = NULL;
    *out_len = 0;
    if (setjmp(err.jump)) {
        memcpy(job->message, err.message, sizeof(job->message));
        if (have_c)
            jpeg_destroy_compress(&cinfo);
        jpeg_destroy_decompress(&dinfo);
        free(*out);
        *out = NULL;
        return ROI_LIBJPEG;
    }
    jpeg_create_decompress(&dinfo);
    dinfo.mem->max_memory_to_use = ROI_MAX_VIRT_MEMORY;
    jpeg_mem_src(&dinfo, job->src, job->src_len);
    jpeg_read_header(&dinfo, TRUE);
    job->width = dinfo.image_width;
    job->height = dinfo.image_height;
    /* The layouts validate() refuses (TurboJPEG's probe) are not rewritten either: the
     * packer's fallback, validate_jpeg, then rejects them with TurboJPEG's message. */
    if (dinfo.progressive_mode || dinfo.arith_code || dinfo.data_precision != 8 ||
        !colorspace_supported(&dinfo) || roi_subsamp(&dinfo) < 0) {
        jpeg_destroy_decompress(&dinfo);
        return ROI_COLORSPACE; /* "not applicable": the caller keeps the source */
    }
    coefs = jpeg_read_coefficients(&dinfo);
    jpeg_create_compress(&cinfo);
    have_c = 1;
    jpeg_mem_dest(&cinfo, out, out_len);
    jpeg_copy_critical_parameters(&dinfo, &cinfo);
    cinfo.optimize_coding = FALSE;
    cinfo.restart_interval = interval;
    jpeg_write_coefficients(&cinfo, coefs);
    jpeg_finish_compress(&cinfo);
    jpeg_finish_decompress(&dinfo); /* reads to EOI: data after the scan warns, as a decode */
    jpeg_destroy_compress(&cinfo);
    jpeg_destroy_decompress(&dinfo);
    return ROI_OK;
}

PyDoc_STRVAR(add_restarts_doc,
"add_restarts(src, interval=1) -> bytes or None\n"
"\n"
"The JPEG `src` rewritten losslessly with a restart marker every `interval` MCUs (1..65535)\n"
"and optimised Huffman tables: the same DCT coefficients, quantisation tables, sampling and\n"
"colour space, so every decode of it gives the source's pixels.  None where the rewrite does\n"
"not apply (progressive or arithmetic-coded files, CMYK/YCCK, 12-bit).  Raises ValueError on\n"
"any libjpeg error or warning (corrupt or truncated data).  The GIL is released meanwhile.");

static PyObject *
add_restarts(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"src", "interval", NULL};
    Py_buffer src;
    roi_job job;
    int status, interval = 1;
    unsigned char *out = NULL;
    unsigned long out_len = 0;
    PyObject *res;
    (void)self;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*|i:add_restarts", kwlist, &src,
                                     &interval))
        return NULL;
    if (interval < 1 || interval > 65535) {
        PyBuffer_Release(&src);
        PyErr_Format(PyExc_ValueError, "interval must be in 1..65535 MCUs, got %d", interval);
        return NULL;
    }
    memset(&job, 0, sizeof(job));
    if (roi_set_src(&job, &src) < 0) {
        PyBuffer_Release(&src);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    status = roi_add_restarts(&job, (unsigned int)interval, &out, &out_len);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&src);
    if (status == ROI_COLORSPACE)
        Py_RETURN_NONE;
    if (status != ROI_OK)
        return roi_raise(&job, status);
    res = PyBytes_FromStringAndSize((const char *)out, (Py_ssize_t)out_len);
    free(out);
    return res;
}

static PyMethodDef roi_methods[] = {
    {"decode_crop", (PyCFunction)(void (*)(void))decode_crop, METH_VARARGS | METH_KEYWORDS,
     decode_crop_doc},
    {"header", (PyCFunction)(void (*)(void))header, METH_VARARGS | METH_KEYWORDS, header_doc},
    {"validate", (PyCFunction)(void (*)(void))validate, METH_VARARGS | METH_KEYWORDS,
     validate_doc},
    {"add_restarts", (PyCFunction)(void (*)(void))add_restarts, METH_VARARGS | METH_KEYWORDS,
     add_restarts_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef roi_module = {
    PyModuleDef_HEAD_INIT,
    "engine.data._jpegroi",
    "Window (region-of-interest) JPEG decoding with libjpeg-turbo: decode_crop, header, "
    "validate.",
    -1,
    roi_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__jpegroi(void)
{
    PyObject *m = PyModule_Create(&roi_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "LIBJPEG_VERSION", JPEG_LIB_VERSION) < 0 ||
        PyModule_AddIntConstant(m, "MAX_VIRT_MEMORY", ROI_MAX_VIRT_MEMORY) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
