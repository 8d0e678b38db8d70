/*
 * engine.data._jpegroi's Huffman decoder for baseline scans (see _jpeghuff.c).
 */
#ifndef ENGINE_JPEGHUFF_H
#define ENGINE_JPEGHUFF_H

#include <stddef.h>
#include <stdio.h>

#include <jpeglib.h>

/* After jpeg_start_decompress(cinfo): replace libjpeg's Huffman decoder with this module's,
 * which decodes the same coefficients and meets corrupt data exactly as libjpeg-turbo 2.1
 * does (the same warnings at the same bytes), faster.  Only for what it was built for: one
 * baseline Huffman scan of every component, 8-bit, no restart markers, nothing decoded yet.
 * Returns 1 if installed, 0 if cinfo is left as it was. */
int huff_install(j_decompress_ptr cinfo);

#endif
