/* Optional C speed-ups for coco_eval (the package works without them: coco_eval._rle has a numpy fallback).
 *
 * rle_check(counts, totals) validates COCO compressed RLE strings as pycocotools' rleFrString reads them
 * (5 data bits per character, 0x20 = more characters follow, 0x10 in the last character = negative, counts
 * from the third on are deltas to the count two places back) and returns the mask area of each.
 * pycocotools never checks an RLE: counts that do not add up to h * w give a silently wrong IoU, and decoding
 * such a mask writes past the buffer. Written by hand because no installed library exposes this check.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>

/* Result codes (negative) for malformed strings; >= 0 is the area. Mirrored in coco_eval/_rle.py. */
#define RLE_BAD_TYPE (-1)
#define RLE_BAD_CHAR (-2)
#define RLE_NEGATIVE (-3)
#define RLE_BAD_TOTAL (-4)

static long long check_one(const unsigned char *s, Py_ssize_t n, long long total) {
  long long prev2 = 0, prev1 = 0, sum = 0, area = 0;
  Py_ssize_t p = 0, m = 0;
  while (p < n) {
    long long x = 0;
    int k = 0, more = 1;
    while (more) {
      if (p >= n) return RLE_BAD_CHAR; /* the last token is cut off */
      int c = (int)s[p] - 48;
      if (c < 0 || c > 63 || k >= 7) return RLE_BAD_CHAR; /* 7 characters hold 35 bits: more than a uint32 */
      x |= (long long)(c & 0x1f) << (5 * k);
      more = c & 0x20;
      p++;
      k++;
      if (!more && (c & 0x10)) x -= (long long)1 << (5 * k); /* sign-extend */
    }
    if (m > 2) x += prev2;
    if (x < 0) return RLE_NEGATIVE;
    sum += x;
    if (sum > total) return RLE_BAD_TOTAL;
    if (m & 1) area += x;
    prev2 = prev1;
    prev1 = x;
    m++;
  }
  return sum == total ? area : RLE_BAD_TOTAL;
}

static PyObject *rle_check(PyObject *self, PyObject *args) {
  PyObject *counts, *totals;
  if (!PyArg_ParseTuple(args, "OO", &counts, &totals)) return NULL;
  PyObject *cseq = PySequence_Fast(counts, "counts must be a sequence");
  if (!cseq) return NULL;
  PyObject *tseq = PySequence_Fast(totals, "totals must be a sequence");
  if (!tseq) {
    Py_DECREF(cseq);
    return NULL;
  }
  Py_ssize_t n = PySequence_Fast_GET_SIZE(cseq);
  if (PySequence_Fast_GET_SIZE(tseq) != n) {
    Py_DECREF(cseq);
    Py_DECREF(tseq);
    PyErr_SetString(PyExc_ValueError, "counts and totals differ in length");
    return NULL;
  }
  PyObject *out = PyList_New(n);
  if (!out) goto fail;
  for (Py_ssize_t i = 0; i < n; i++) {
    PyObject *c = PySequence_Fast_GET_ITEM(cseq, i);
    long long total = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(tseq, i));
    if (total == -1 && PyErr_Occurred()) goto fail;
    const char *buf = NULL;
    Py_ssize_t len = 0;
    long long r;
    if (PyBytes_Check(c)) {
      buf = PyBytes_AS_STRING(c);
      len = PyBytes_GET_SIZE(c);
      r = check_one((const unsigned char *)buf, len, total);
    } else if (PyUnicode_Check(c)) {
      buf = PyUnicode_AsUTF8AndSize(c, &len);
      if (!buf) goto fail;
      r = check_one((const unsigned char *)buf, len, total);
    } else {
      r = RLE_BAD_TYPE;
    }
    PyObject *v = PyLong_FromLongLong(r);
    if (!v) goto fail;
    PyList_SET_ITEM(out, i, v);
  }
  Py_DECREF(cseq);
  Py_DECREF(tseq);
  return out;
fail:
  Py_XDECREF(out);
  Py_DECREF(cseq);
  Py_DECREF(tseq);
  return NULL;
}


/* One pass over a compressed string: area (sum of odd runs), pycocotools' rleToBbox and the checks of
 * check_one. Returns the area or a code < 0; writes the box (x, y, w, h) to bb. No Python calls (runs
 * without the GIL). rleToBbox uses the first m - m % 2 runs: an even-index run's position is applied only
 * once the following odd-index run arrives. */
static long long area_bbox_one(const unsigned char *s, Py_ssize_t n, long long h, long long w, double *bb,
                               int with_bbox) {
  long long prev2 = 0, prev1 = 0, sum = 0, area = 0, total = h * w;
  unsigned long long uh = (unsigned long long)(h > 0 ? h : 1), xs = ~0ull, ys = ~0ull, xe = 0, ye = 0, xp = 0;
  unsigned long long cx = 0, cy = 0, px = 0, py = 0; /* (column, row) of the running sum, kept without a
                                                        division per run: most runs cross <= 1 column */
  Py_ssize_t p = 0, m = 0;
  bb[0] = bb[1] = bb[2] = bb[3] = 0;
  while (p < n) {
    long long x = 0;
    int k = 0, more = 1;
    while (more) {
      if (p >= n) return RLE_BAD_CHAR; /* the last count is cut off */
      int c = (int)s[p] - 48;
      if (c < 0 || c > 63 || k >= 7) return RLE_BAD_CHAR; /* 7 characters hold 35 bits: more than a uint32 */
      x |= (long long)(c & 0x1f) << (5 * k);
      more = c & 0x20;
      p++;
      k++;
      if (!more && (c & 0x10)) x -= (long long)1 << (5 * k); /* sign-extend */
    }
    if (m > 2) x += prev2; /* counts from the fourth on are deltas to the count two places back */
    if (x < 0) return RLE_NEGATIVE;
    sum += x;
    if (sum > total) return RLE_BAD_TOTAL;
    if (!with_bbox) {
      if (m & 1) area += x;
      prev2 = prev1;
      prev1 = x;
      m++;
      continue;
    }
    cy += (unsigned long long)x;
    if (cy >= uh) {
      if (cy < 2 * uh) {
        cy -= uh;
        cx++;
      } else {
        cx += cy / uh;
        cy %= uh;
      }
    }
    if (m & 1) {
      area += x;
      /* the pending even run (its end = first pixel of this run), then this run's last pixel */
      unsigned long long ex = px, ey = py, ox = cx, oy = cy;
      if (oy > 0) oy--;
      else {
        oy = uh - 1;
        ox--;
      }
      xp = ex;
      if (ex < xs) xs = ex;
      if (ex > xe) xe = ex;
      if (ey < ys) ys = ey;
      if (ey > ye) ye = ey;
      if (xp < ox) {
        ys = 0;
        ye = uh - 1;
      }
      if (ox < xs) xs = ox;
      if (ox > xe) xe = ox;
      if (oy < ys) ys = oy;
      if (oy > ye) ye = oy;
    } else {
      px = cx;
      py = cy;
    }
    prev2 = prev1;
    prev1 = x;
    m++;
  }
  if (sum != total) return RLE_BAD_TOTAL;
  if (with_bbox && m >= 2 && h > 0) {
    bb[0] = (double)xs;
    bb[1] = (double)ys;
    bb[2] = (double)(xe - xs + 1);
    bb[3] = (double)(ye - ys + 1);
  }
  (void)w;
  return area;
}

/* rle_area_bbox(counts, sizes: N*2 int64 buffer) -> (bytes of N int64 areas or codes < 0, bytes of N*4 float64 boxes).
 * The strings are parsed without the GIL, so several Python threads can each take a slice of a list. */
static PyObject *rle_area_bbox(PyObject *self, PyObject *args) {
  PyObject *counts;
  Py_buffer sizes;
  int with_bbox = 1;
  if (!PyArg_ParseTuple(args, "Oy*|p", &counts, &sizes, &with_bbox)) return NULL;
  PyObject *cseq = PySequence_Fast(counts, "counts must be a sequence");
  if (!cseq) {
    PyBuffer_Release(&sizes);
    return NULL;
  }
  PyObject *areas = NULL, *boxes = NULL;
  const char **ptr = NULL;
  Py_ssize_t *len = NULL;
  Py_ssize_t n = PySequence_Fast_GET_SIZE(cseq);
  const long long *hw = (const long long *)sizes.buf;
  if (sizes.len != n * 2 * (Py_ssize_t)sizeof(long long)) {
    PyErr_SetString(PyExc_ValueError, "sizes must hold N (height, width) int64 pairs");
    goto fail;
  }
  areas = PyBytes_FromStringAndSize(NULL, n * 8);
  boxes = PyBytes_FromStringAndSize(NULL, n * 4 * (Py_ssize_t)sizeof(double));
  ptr = (const char **)PyMem_Malloc((size_t)(n ? n : 1) * sizeof(char *));
  len = (Py_ssize_t *)PyMem_Malloc((size_t)(n ? n : 1) * sizeof(Py_ssize_t));
  if (!areas || !boxes || !ptr || !len) {
    PyErr_NoMemory();
    goto fail;
  }
  for (Py_ssize_t i = 0; i < n; i++) { /* with the GIL: pointers into the (kept alive) str / bytes objects */
    PyObject *c = PySequence_Fast_GET_ITEM(cseq, i);
    ptr[i] = NULL;
    len[i] = 0;
    if (PyUnicode_Check(c)) {
      ptr[i] = PyUnicode_AsUTF8AndSize(c, &len[i]);
      if (!ptr[i]) goto fail;
    } else if (PyBytes_Check(c)) {
      ptr[i] = PyBytes_AS_STRING(c);
      len[i] = PyBytes_GET_SIZE(c);
    }
  }
  long long *pa = (long long *)PyBytes_AS_STRING(areas);
  double *pb = (double *)PyBytes_AS_STRING(boxes);
  Py_BEGIN_ALLOW_THREADS
  for (Py_ssize_t i = 0; i < n; i++) {
    if (!ptr[i]) {
      pa[i] = RLE_BAD_TYPE;
      pb[4 * i] = pb[4 * i + 1] = pb[4 * i + 2] = pb[4 * i + 3] = 0;
    } else {
      pa[i] = area_bbox_one((const unsigned char *)ptr[i], len[i], hw[2 * i], hw[2 * i + 1], pb + 4 * i, with_bbox);
    }
  }
  Py_END_ALLOW_THREADS
  PyMem_Free(ptr);
  PyMem_Free(len);
  PyBuffer_Release(&sizes);
  Py_DECREF(cseq);
  return Py_BuildValue("(NN)", areas, boxes);
fail:
  PyMem_Free(ptr);
  PyMem_Free(len);
  PyBuffer_Release(&sizes);
  Py_XDECREF(areas);
  Py_XDECREF(boxes);
  Py_DECREF(cseq);
  return NULL;
}

static PyObject *k_image_id, *k_category_id, *k_score, *k_bbox, *k_segmentation, *k_counts, *k_size;

static int as_int64(PyObject *v, long long *out) {
  if (!PyLong_CheckExact(v)) return 0;
  int overflow = 0;
  *out = PyLong_AsLongLongAndOverflow(v, &overflow);
  return !overflow && !(*out == -1 && PyErr_Occurred());
}

static int as_double(PyObject *v, double *out) {
  if (PyFloat_CheckExact(v)) *out = PyFloat_AS_DOUBLE(v);
  else if (PyLong_CheckExact(v)) {
    *out = PyLong_AsDouble(v);
    if (*out == -1.0 && PyErr_Occurred()) {
      PyErr_Clear();
      return 0;
    }
  } else return 0;
  return isfinite(*out);
}

/* extract(records, bbox: bool) -> (first index the fast path cannot take or -1, image_ids bytes (int64),
 * category_ids bytes (int64), scores bytes (float64), boxes bytes (N*4 float64) | segmentation dicts,
 * sizes bytes (N*2 int64) | None, counts strings | None). Only plain ints, floats, lists and str are taken; anything else
 * (numpy scalars, bytes counts, masks as arrays, a missing key) returns its index, and the caller's
 * Python path handles or diagnoses the records. */
static PyObject *extract(PyObject *self, PyObject *args) {
  PyObject *records;
  int want_bbox;
  if (!PyArg_ParseTuple(args, "Op", &records, &want_bbox)) return NULL;
  PyObject *seq = PySequence_Fast(records, "records must be a sequence");
  if (!seq) return NULL;
  Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  PyObject *img = PyBytes_FromStringAndSize(NULL, n * 8), *cat = PyBytes_FromStringAndSize(NULL, n * 8);
  PyObject *sc = PyBytes_FromStringAndSize(NULL, n * 8);
  PyObject *geo = want_bbox ? PyBytes_FromStringAndSize(NULL, n * 32) : PyList_New(n);
  PyObject *sizes = want_bbox ? (Py_INCREF(Py_None), Py_None) : PyBytes_FromStringAndSize(NULL, n * 16);
  PyObject *cl = want_bbox ? (Py_INCREF(Py_None), Py_None) : PyList_New(n);
  Py_ssize_t bad = -1;
  if (!img || !cat || !sc || !geo || !sizes || !cl) goto fail;
  long long *pi = (long long *)PyBytes_AS_STRING(img), *pc = (long long *)PyBytes_AS_STRING(cat);
  double *ps = (double *)PyBytes_AS_STRING(sc);
  for (Py_ssize_t i = 0; i < n && bad < 0; i++) {
    PyObject *d = PySequence_Fast_GET_ITEM(seq, i), *v;
    if (!PyDict_Check(d)) {
      bad = i;
      break;
    }
    if (!(v = PyDict_GetItemWithError(d, k_image_id)) || !as_int64(v, pi + i)) goto next_bad;
    if (!(v = PyDict_GetItemWithError(d, k_category_id)) || !as_int64(v, pc + i)) goto next_bad;
    if (!(v = PyDict_GetItemWithError(d, k_score)) || !as_double(v, ps + i)) goto next_bad;
    if (want_bbox) {
      double *pb = (double *)PyBytes_AS_STRING(geo) + 4 * i;
      v = PyDict_GetItemWithError(d, k_bbox);
      if (!v || !(PyList_CheckExact(v) || PyTuple_CheckExact(v))) goto next_bad;
      PyObject *bs = PySequence_Fast(v, "");
      if (!bs) goto fail;
      int ok = PySequence_Fast_GET_SIZE(bs) == 4;
      for (int j = 0; ok && j < 4; j++) ok = as_double(PySequence_Fast_GET_ITEM(bs, j), pb + j);
      Py_DECREF(bs);
      if (!ok) goto next_bad;
    } else {
      long long *pz = (long long *)PyBytes_AS_STRING(sizes) + 2 * i;
      v = PyDict_GetItemWithError(d, k_segmentation);
      if (!v || !PyDict_CheckExact(v)) goto next_bad;
      PyObject *c = PyDict_GetItemWithError(v, k_counts), *z = PyDict_GetItemWithError(v, k_size);
      if (!c || !z || !PyUnicode_CheckExact(c) || !PyList_CheckExact(z) || PyList_GET_SIZE(z) != 2) goto next_bad;
      if (!as_int64(PyList_GET_ITEM(z, 0), pz) || !as_int64(PyList_GET_ITEM(z, 1), pz + 1)) goto next_bad;
      Py_INCREF(v);
      PyList_SET_ITEM(geo, i, v);
      Py_INCREF(c);
      PyList_SET_ITEM(cl, i, c);
    }
    continue;
  next_bad:
    if (PyErr_Occurred()) goto fail;
    bad = i;
  }
  if (bad >= 0 && !want_bbox) { /* fill the rest so the list is valid */
    for (Py_ssize_t i = 0; i < n; i++)
      if (!PyList_GET_ITEM(geo, i)) {
        Py_INCREF(Py_None);
        PyList_SET_ITEM(geo, i, Py_None);
        Py_INCREF(Py_None);
        PyList_SET_ITEM(cl, i, Py_None);
      }
  }
  Py_DECREF(seq);
  return Py_BuildValue("(nNNNNNN)", bad, img, cat, sc, geo, sizes, cl);
fail:
  Py_DECREF(seq);
  Py_XDECREF(img);
  Py_XDECREF(cat);
  Py_XDECREF(sc);
  Py_XDECREF(geo);
  Py_XDECREF(sizes);
  Py_XDECREF(cl);
  return NULL;
}

/* ---------------------------------------------------------------------------------------------------------
 * Panoptic: PNG scanlines -> (GT segment, predicted segment) overlap matrix in one pass.
 * The caller inflates the IDAT stream (Python's zlib); here the PNG filters are undone row by row (PNG spec:
 * None, Sub, Up, Average, Paeth; 8-bit RGB or RGBA, not interlaced), each pixel's id R + 256 G + 65536 B is
 * mapped to its segment's index (0 = VOID) through a small hash table, and counts[g * (P + 1) + p] is
 * incremented. No id image is ever materialised. Written by hand: no installed library decodes a PNG
 * straight into such counts, and decoding through PIL + numpy costs 3x more than the whole of this.
 * --------------------------------------------------------------------------------------------------------- */

typedef struct {
  uint32_t *keys; /* id + 1 (0 = empty slot) */
  int32_t *vals;
  uint32_t mask;
} IdTable;

static int table_init(IdTable *t, const int64_t *ids, Py_ssize_t n) {
  uint32_t size = 16;
  while (size < 4 * (uint64_t)n) size <<= 1;
  t->keys = (uint32_t *)PyMem_Calloc(size, sizeof(uint32_t));
  t->vals = (int32_t *)PyMem_Calloc(size, sizeof(int32_t));
  t->mask = size - 1;
  if (!t->keys || !t->vals) return -1;
  for (Py_ssize_t i = 0; i < n; i++) {
    uint32_t key = (uint32_t)ids[i] + 1, h = (key * 2654435761u) & t->mask;
    while (t->keys[h] && t->keys[h] != key) h = (h + 1) & t->mask;
    t->keys[h] = key;
    t->vals[h] = (int32_t)(i + 1);
  }
  return 0;
}

static inline int32_t table_get(const IdTable *t, uint32_t id) {
  if (id == 0) return 0;
  uint32_t key = id + 1, h = (key * 2654435761u) & t->mask;
  while (t->keys[h]) {
    if (t->keys[h] == key) return t->vals[h];
    h = (h + 1) & t->mask;
  }
  return -1;
}

static void table_free(IdTable *t) {
  PyMem_Free(t->keys);
  PyMem_Free(t->vals);
}

static inline unsigned char paeth(int a, int b, int c) {
  int p = a + b - c, pa = abs(p - a), pb = abs(p - b), pc = abs(p - c);
  return (unsigned char)((pa <= pb && pa <= pc) ? a : (pb <= pc ? b : c));
}

/* Undo one row's filter in place; prev is the previous unfiltered row (zeros for the first). The left
 * neighbour is carried in locals, not re-read from the row (a store-to-load round trip per byte would
 * serialise Sub / Average / Paeth), and BPP is a compile-time constant so that the channel loop unrolls. */
#define UNFILTER_BODY(BPP)                                                                            \
  do {                                                                                                \
    Py_ssize_t i;                                                                                     \
    int c, l[BPP] = {0}, ul[BPP] = {0};                                                               \
    switch (type) {                                                                                   \
      case 0:                                                                                         \
        return 0;                                                                                     \
      case 1:                                                                                         \
        for (i = 0; i < len; i += BPP)                                                                \
          for (c = 0; c < BPP; c++) l[c] = row[i + c] = (unsigned char)(row[i + c] + l[c]);           \
        return 0;                                                                                     \
      case 2:                                                                                         \
        for (i = 0; i < len; i++) row[i] = (unsigned char)(row[i] + prev[i]);                        \
        return 0;                                                                                     \
      case 3:                                                                                         \
        for (i = 0; i < len; i += BPP)                                                                \
          for (c = 0; c < BPP; c++)                                                                   \
            l[c] = row[i + c] = (unsigned char)(row[i + c] + ((l[c] + prev[i + c]) >> 1));            \
        return 0;                                                                                     \
      case 4:                                                                                         \
        for (i = 0; i < len; i += BPP)                                                                \
          for (c = 0; c < BPP; c++) {                                                                 \
            int up = prev[i + c];                                                                     \
            l[c] = row[i + c] = (unsigned char)(row[i + c] + paeth(l[c], up, ul[c]));                 \
            ul[c] = up;                                                                               \
          }                                                                                           \
        return 0;                                                                                     \
    }                                                                                                 \
    return -1;                                                                                        \
  } while (0)

static int unfilter3(unsigned char *restrict row, const unsigned char *restrict prev, int type, Py_ssize_t len) {
  UNFILTER_BODY(3);
}

static int unfilter4(unsigned char *restrict row, const unsigned char *restrict prev, int type, Py_ssize_t len) {
  UNFILTER_BODY(4);
}

static int unfilter(unsigned char *row, const unsigned char *prev, int type, Py_ssize_t len, int bpp) {
  return bpp == 3 ? unfilter3(row, prev, type, len) : unfilter4(row, prev, type, len);
}

typedef struct {
  const unsigned char *raw;
  int channels;
  unsigned char *cur, *prev;
  IdTable table;
  uint32_t last_id;
  int32_t last_index;
  uint32_t unknown[10];
  int n_unknown;
} Source;

/* Segment index of a pixel id (0 = VOID); an unknown id is remembered (up to 10) and counted as VOID. */
static int32_t lookup(Source *s, uint32_t id) {
  int32_t i = table_get(&s->table, id);
  if (i < 0) {
    int seen = 0;
    for (int u = 0; u < s->n_unknown; u++) seen |= s->unknown[u] == id;
    if (!seen && s->n_unknown < 10) s->unknown[s->n_unknown++] = id;
    i = 0;
  }
  return i;
}

/* png_overlap(gt_raw, gt_channels, pred_raw, pred_channels, width, height, gt_ids, pred_ids) ->
 * (channels 0: that side is an (H, W) uint32 id array instead of PNG scanlines) ->
 * (counts bytes ((G + 1) * (P + 1) int64), unknown GT ids, unknown predicted ids, error message or None).
 * gt_ids / pred_ids: sorted int64 buffers of the segment ids of segments_info. */
static PyObject *png_overlap(PyObject *self, PyObject *args) {
  Py_buffer braw[2], bids[2];
  int channels[2];
  Py_ssize_t width, height;
  if (!PyArg_ParseTuple(args, "y*iy*inny*y*", &braw[0], &channels[0], &braw[1], &channels[1], &width, &height,
                        &bids[0], &bids[1]))
    return NULL;
  Source src[2];
  memset(src, 0, sizeof(src));
  uint32_t *rowids[2] = {NULL, NULL}; /* one row of ids per PNG side */
  PyObject *counts = NULL, *result = NULL;
  const char *error = NULL;
  Py_ssize_t n_ids[2] = {bids[0].len / 8, bids[1].len / 8};
  Py_ssize_t ncol = n_ids[1] + 1, ncell = (n_ids[0] + 1) * ncol;
  counts = PyBytes_FromStringAndSize(NULL, ncell * 8);
  if (!counts) goto done;
  int64_t *cnt = (int64_t *)PyBytes_AS_STRING(counts);
  memset(cnt, 0, (size_t)ncell * 8);
  for (int k = 0; k < 2; k++) {
    Py_ssize_t stride = width * channels[k];
    if (channels[k] == 0) { /* an id array: H * W uint32, no PNG */
      if (braw[k].len != height * width * 4) {
        PyErr_SetString(PyExc_ValueError, "id array size does not match width * height");
        goto done;
      }
    } else if ((channels[k] != 3 && channels[k] != 4) || braw[k].len != height * (stride + 1)) {
      PyErr_SetString(PyExc_ValueError, "decompressed PNG data does not match its header");
      goto done;
    }
    rowids[k] = (uint32_t *)PyMem_Malloc((size_t)(width ? width : 1) * sizeof(uint32_t));
    if (!rowids[k]) {
      PyErr_NoMemory();
      goto done;
    }
    src[k].raw = (const unsigned char *)braw[k].buf;
    src[k].channels = channels[k];
    src[k].cur = (unsigned char *)PyMem_Malloc((size_t)stride + 1);  /* stride 0 for an id array: unused */
    src[k].prev = (unsigned char *)PyMem_Calloc((size_t)stride + 1, 1);
    if (!src[k].cur || !src[k].prev || table_init(&src[k].table, (const int64_t *)bids[k].buf, n_ids[k]) < 0) {
      PyErr_NoMemory();
      goto done;
    }
    src[k].last_id = 0;
    src[k].last_index = 0;
  }
  Py_BEGIN_ALLOW_THREADS
  /* the last ids seen and their segment indices, carried across rows (0xFFFFFFFF: no id yet) */
  uint32_t la = 0xFFFFFFFFu, lb = 0xFFFFFFFFu;
  int32_t ia = 0, ib = 0;
  Py_ssize_t cell = -1, run = 0; /* the open run continues into the next row */
  for (Py_ssize_t y = 0; y < height && !error; y++) {
    const uint32_t *ids[2];
    for (int k = 0; k < 2; k++) {
      if (src[k].channels == 0) {
        ids[k] = (const uint32_t *)src[k].raw + y * width;
        continue;
      }
      Py_ssize_t stride = width * src[k].channels;
      const unsigned char *in = src[k].raw + y * (stride + 1);
      memcpy(src[k].cur, in + 1, (size_t)stride);
      if (unfilter(src[k].cur, src[k].prev, in[0], stride, src[k].channels) < 0) error = "unknown PNG filter type";
      const unsigned char *px = src[k].cur;
      const int ch = src[k].channels;
      uint32_t *out = rowids[k];
      for (Py_ssize_t x = 0; x < width; x++, px += ch)
        out[x] = (uint32_t)px[0] | ((uint32_t)px[1] << 8) | ((uint32_t)px[2] << 16);
      ids[k] = out;
    }
    if (error) break;
    const uint32_t *ra = ids[0], *rb = ids[1];
    /* runs of one (GT, pred) cell are counted in locals and added once: no load-increment-store per pixel,
       and the per-pixel work is two id reads and two compares while both segments continue */
    for (Py_ssize_t x = 0; x < width; x++) {
      const uint32_t ida = ra[x], idb = rb[x];
      if (ida == la && idb == lb) {
        run++;
        continue;
      }
      if (ida != la) {
        ia = lookup(&src[0], ida);
        la = ida;
      }
      if (idb != lb) {
        ib = lookup(&src[1], idb);
        lb = idb;
      }
      if (cell >= 0) cnt[cell] += run;
      cell = (Py_ssize_t)ia * ncol + ib;
      run = 1;
    }
    for (int k = 0; k < 2; k++) {
      if (src[k].channels == 0) continue;
      unsigned char *t = src[k].prev;
      src[k].prev = src[k].cur;
      src[k].cur = t;
    }
  }
  if (cell >= 0) cnt[cell] += run;
  Py_END_ALLOW_THREADS
  {
    PyObject *unk[2];
    for (int k = 0; k < 2; k++) {
      unk[k] = PyList_New(src[k].n_unknown);
      if (!unk[k]) {
        if (k) Py_DECREF(unk[0]);
        goto done;
      }
      for (int u = 0; u < src[k].n_unknown; u++) PyList_SET_ITEM(unk[k], u, PyLong_FromUnsignedLong(src[k].unknown[u]));
    }
    result = Py_BuildValue("(ONNs)", counts, unk[0], unk[1], error);
  }
done:
  for (int k = 0; k < 2; k++) {
    PyMem_Free(rowids[k]);
    PyMem_Free(src[k].cur);
    PyMem_Free(src[k].prev);
    table_free(&src[k].table);
    PyBuffer_Release(&braw[k]);
    PyBuffer_Release(&bids[k]);
  }
  Py_XDECREF(counts);
  return result;
}

static PyMethodDef methods[] = {
    {"rle_check", rle_check, METH_VARARGS,
     "rle_check(counts, totals) -> list[int]: area of each compressed RLE, or a negative code if malformed."},
    {"rle_area_bbox", rle_area_bbox, METH_VARARGS,
     "rle_area_bbox(counts, sizes, with_bbox=True) -> (N int64 areas or codes < 0, N*4 float64 boxes or zeros)\nas bytes; sizes: N*2 int64."},
    {"png_overlap", png_overlap, METH_VARARGS,
     "png_overlap(gt_raw, gt_ch, pred_raw, pred_ch, w, h, gt_ids, pred_ids) -> (counts, unknown gt, unknown pred, error)"},
    {"extract", extract, METH_VARARGS, "extract(records, bbox) -> columns of COCO result records (see source)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_speedups", NULL, -1, methods};

PyMODINIT_FUNC PyInit__speedups(void) {
  k_image_id = PyUnicode_InternFromString("image_id");
  k_category_id = PyUnicode_InternFromString("category_id");
  k_score = PyUnicode_InternFromString("score");
  k_bbox = PyUnicode_InternFromString("bbox");
  k_segmentation = PyUnicode_InternFromString("segmentation");
  k_counts = PyUnicode_InternFromString("counts");
  k_size = PyUnicode_InternFromString("size");
  if (!k_image_id || !k_category_id || !k_score || !k_bbox || !k_segmentation || !k_counts || !k_size) return NULL;
  return PyModule_Create(&module);
}
