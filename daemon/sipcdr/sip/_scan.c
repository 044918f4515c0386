/* The SIP parser's innermost loop in one pass over the bytes: the start line, the
 * header lines, and the first value of each wanted header.
 *
 * It does what sipcdr/sip/parser.py does for a regular message (CRLF line ends, valid
 * UTF-8, no NUL, no folded line, ASCII header names, at most MAX_HEADER_LINES lines)
 * and declines everything else by returning None: the parser then takes its Python
 * path, which handles every case. The differential tests hold the two to the same
 * results on every corpus the suite has.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

/* Header names as the parser compares them: lower case, whitespace stripped. */
#define MAX_WANTED 32
#define MAX_NAME 32

typedef struct {
    Py_ssize_t len;
    char name[MAX_NAME];
    long slot;
} Wanted;

static Wanted wanted[MAX_WANTED];
static int wanted_count = 0;
static Py_ssize_t max_lines = 0;

/* str.strip() without arguments, on ASCII: what str.isspace() calls whitespace. */
static inline int
is_space(unsigned char c)
{
    return c == ' ' || (c >= '\t' && c <= '\r') || (c >= 0x1c && c <= 0x1f);
}

/* Slot of an ASCII header name (0: not wanted). */
static long
slot_of(const unsigned char *name, Py_ssize_t len)
{
    while (len && is_space(name[0])) {
        name++;
        len--;
    }
    while (len && is_space(name[len - 1])) {
        len--;
    }
    if (len == 0 || len > MAX_NAME) {
        return 0;
    }
    char lower[MAX_NAME];
    for (Py_ssize_t i = 0; i < len; i++) {
        unsigned char c = name[i];
        lower[i] = (char)(c >= 'A' && c <= 'Z' ? c + 32 : c);
    }
    for (int i = 0; i < wanted_count; i++) {
        if (wanted[i].len == len && memcmp(wanted[i].name, lower, (size_t)len) == 0) {
            return wanted[i].slot;
        }
    }
    return 0;
}

/* A str from bytes known to be ASCII, or from UTF-8 (NULL with no error set: invalid). */
static PyObject *
text(const char *start, Py_ssize_t len, int ascii)
{
    if (ascii) {
        PyObject *out = PyUnicode_New(len, 127);
        if (out != NULL) {
            memcpy(PyUnicode_DATA(out), start, (size_t)len);
        }
        return out;
    }
    PyObject *out = PyUnicode_DecodeUTF8(start, len, NULL);
    if (out == NULL && PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
        PyErr_Clear();
    }
    return out;
}

static PyObject *
set_wanted(PyObject *module, PyObject *args)
{
    PyObject *names;
    Py_ssize_t lines;
    if (!PyArg_ParseTuple(args, "O!n", &PyDict_Type, &names, &lines)) {
        return NULL;
    }
    if (PyDict_Size(names) > MAX_WANTED) {
        PyErr_SetString(PyExc_ValueError, "too many wanted headers");
        return NULL;
    }
    Wanted table[MAX_WANTED];
    int count = 0;
    PyObject *key, *value;
    Py_ssize_t pos = 0;
    while (PyDict_Next(names, &pos, &key, &value)) {
        Py_ssize_t len;
        const char *name = PyUnicode_Check(key) ? PyUnicode_AsUTF8AndSize(key, &len) : NULL;
        if (name == NULL || len == 0 || len > MAX_NAME || !PyLong_Check(value)) {
            PyErr_Clear();
            PyErr_SetString(PyExc_ValueError, "wanted headers: short str names to int slots");
            return NULL;
        }
        for (Py_ssize_t i = 0; i < len; i++) {
            unsigned char c = (unsigned char)name[i];
            if (c >= 0x80 || (c >= 'A' && c <= 'Z') || is_space(c)) {
                PyErr_SetString(PyExc_ValueError, "wanted header names are lower-case ASCII");
                return NULL;
            }
        }
        long slot = PyLong_AsLong(value);
        if (slot <= 0) {
            PyErr_Clear();
            PyErr_SetString(PyExc_ValueError, "wanted header slots are positive");
            return NULL;
        }
        table[count].len = len;
        memcpy(table[count].name, name, (size_t)len);
        table[count].slot = slot;
        count++;
    }
    memcpy(wanted, table, sizeof(table));
    wanted_count = count;
    max_lines = lines;
    Py_RETURN_NONE;
}

/* scan_head(data) -> (start_line, header_lines, {slot: first value}, body_start) | None */
static PyObject *
scan_head(PyObject *module, PyObject *arg)
{
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "scan_head expects bytes");
        return NULL;
    }
    const char *data = PyBytes_AS_STRING(arg);
    const Py_ssize_t size = PyBytes_GET_SIZE(arg);
    const char *end = data + size;
    PyObject *start_line = NULL, *lines = NULL, *first = NULL, *result = NULL;
    const char *pos = data;
    Py_ssize_t count = 0;
    int decline = 0;

    lines = PyList_New(0);
    first = PyDict_New();
    if (lines == NULL || first == NULL) {
        goto done;
    }
    for (;;) {
        if (end - pos >= 2 && pos[0] == '\r' && pos[1] == '\n' && count) {
            break; /* the blank line: the body follows */
        }
        /* One pass over the line: its end, its first colon, and what would send the
         * message to the Python path. */
        const char *colon = NULL;
        const char *p = pos;
        int ascii = 1;
        for (; p < end; p++) {
            unsigned char c = (unsigned char)*p;
            if (c == '\n') {
                break;
            }
            if (c == 0) {
                goto decline;
            }
            if (c >= 0x80) {
                ascii = 0;
            }
            else if (c == ':' && colon == NULL) {
                colon = p;
            }
        }
        /* No line end (no blank line), or a bare LF. */
        if (p == end || p == pos || p[-1] != '\r') {
            goto decline;
        }
        const char *line_end = p - 1;
        if (++count > max_lines) {
            goto decline;
        }
        if (count == 1) {
            start_line = text(pos, line_end - pos, ascii);
            if (start_line == NULL) {
                goto decline_or_fail;
            }
            pos = p + 1;
            continue;
        }
        if (pos[0] == ' ' || pos[0] == '\t') {
            goto decline; /* folded: unfolding is the Python path's */
        }
        PyObject *line = text(pos, line_end - pos, ascii);
        if (line == NULL) {
            goto decline_or_fail;
        }
        int failed = PyList_Append(lines, line);
        Py_DECREF(line);
        if (failed) {
            goto done;
        }
        const char *name_end = colon != NULL ? colon : line_end;
        for (const char *q = pos; q < name_end; q++) {
            if ((unsigned char)*q >= 0x80) {
                goto decline; /* str.lower() and str.strip() beyond ASCII */
            }
        }
        long slot = slot_of((const unsigned char *)pos, name_end - pos);
        if (slot) {
            PyObject *key = PyLong_FromLong(slot);
            if (key == NULL) {
                goto done;
            }
            int present = PyDict_Contains(first, key);
            if (present == 0) {
                PyObject *value = colon != NULL
                                      ? text(colon + 1, line_end - colon - 1, ascii)
                                      : PyUnicode_New(0, 127);
                if (value == NULL) {
                    Py_DECREF(key);
                    goto decline_or_fail;
                }
                present = PyDict_SetItem(first, key, value);
                Py_DECREF(value);
            }
            Py_DECREF(key);
            if (present < 0) {
                goto done;
            }
        }
        pos = p + 1;
    }
    result = Py_BuildValue("(OOOn)", start_line, lines, first, (Py_ssize_t)(pos + 2 - data));
    goto done;

decline_or_fail:
    if (PyErr_Occurred()) {
        goto done;
    }
decline:
    decline = 1;
done:
    Py_XDECREF(start_line);
    Py_XDECREF(lines);
    Py_XDECREF(first);
    if (decline) {
        Py_RETURN_NONE;
    }
    return result;
}

static PyMethodDef methods[] = {
    {"scan_head", scan_head, METH_O,
     "scan_head(data) -> (start_line, header_lines, {slot: first value}, body_start), "
     "or None when the message needs the parser's Python path."},
    {"set_wanted", set_wanted, METH_VARARGS,
     "set_wanted({lower-case name: slot}, max_lines): the headers scan_head keeps."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "sipcdr.sip._scan",
    "The SIP header scan in C; see sipcdr/sip/parser.py.", -1, methods,
};

PyMODINIT_FUNC
PyInit__scan(void)
{
    return PyModule_Create(&module);
}
