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

static PyMethodDef methods[] = {
    {"rle_check", rle_check, METH_VARARGS,
     "rle_check(counts, totals) -> list[int]: area of each compressed RLE, or a negative code if malformed."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_speedups", NULL, -1, methods};

PyMODINIT_FUNC PyInit__speedups(void) { return PyModule_Create(&module); }
