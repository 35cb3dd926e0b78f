/* mlipd_client.c: the C client of `mlipd serve` (mlipd_client.h says what it does).
 *
 * The transport mirrors mlipd/client.py: a DEALER socket with its own routing id (a
 * reconnect keeps it, so the server still knows our requests by connection and id),
 * requests sent without blocking (with no connected peer a DEALER would block forever;
 * the next heartbeat sends again), resent every heartbeat/4 while we wait, replies with
 * another id (late answers to earlier requests) skipped. The codec is docs/protocol.md's
 * msgpack envelope, arrays as {dtype, shape, data} with raw little-endian bytes.
 */
#define _POSIX_C_SOURCE 200809L

#include "mlipd_client.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <msgpack.h>
#include <zmq.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "mlipd_client: the wire's arrays are little-endian; big-endian hosts are not supported"
#endif
_Static_assert(sizeof(int) == 4, "numbers travel as <i4");
_Static_assert(sizeof(double) == 8, "positions travel as <f8");

#define ERR_LEN 1024
#define DEFAULT_HEARTBEAT_S 10.0
#define Z85_KEY_LEN 40

struct mlipd_client {
    void *ctx;
    void *sock;
    char *endpoint;
    double timeout_s;
    double heartbeat_s;
    int64_t next_id;
    int curve;
    mlipd_server_info info;
    msgpack_sbuffer out;     /* the request being sent (reused between calls) */
    zmq_msg_t reply_frame;   /* the reply's bytes: unpacked objects point into them */
    int have_frame;
    msgpack_unpacked reply;  /* the reply, parsed */
    int code;
    char error[ERR_LEN];
};

static _Thread_local char last_error[ERR_LEN];
static _Thread_local int last_code;

/* ------------------------------------------------------------------ errors */

static const char *const NAMES[] = {"ok", "bad_input", "too_large", "unknown_species", "busy",
                                    "deadline", "calculation", "unavailable", "protocol",
                                    "internal", "setup"};

const char *mlipd_status_name(int status) {
    if (status > 0 || status < MLIPD_E_SETUP) return "unknown";
    return NAMES[-status];
}

/* wire code -> status; codes the C API does not tell apart map to their family */
static int status_from_code(const char *code, size_t len) {
    static const struct { const char *code; int status; } TABLE[] = {
        {"bad_input", MLIPD_E_BAD_INPUT}, {"too_large", MLIPD_E_TOO_LARGE},
        {"unknown_species", MLIPD_E_UNKNOWN_SPECIES}, {"busy", MLIPD_E_BUSY},
        {"deadline", MLIPD_E_TIMEOUT}, {"calculation", MLIPD_E_CALCULATION},
        {"unavailable", MLIPD_E_UNAVAILABLE}, {"protocol", MLIPD_E_PROTOCOL},
        {"closed", MLIPD_E_PROTOCOL}, {"internal", MLIPD_E_INTERNAL},
        {"setup", MLIPD_E_SETUP}, {"unknown_model", MLIPD_E_SETUP},
        {"model_unavailable", MLIPD_E_SETUP}};
    for (size_t i = 0; i < sizeof TABLE / sizeof TABLE[0]; i++)
        if (strlen(TABLE[i].code) == len && memcmp(TABLE[i].code, code, len) == 0)
            return TABLE[i].status;
    return MLIPD_E_INTERNAL;
}

/* Sets the client's error: "<code>: <text>"; returns status. */
static int fail(mlipd_client *c, int status, const char *fmt, ...) {
    va_list ap;
    int n = snprintf(c->error, ERR_LEN, "%s: ", mlipd_status_name(status));
    va_start(ap, fmt);
    vsnprintf(c->error + n, ERR_LEN - (size_t)n, fmt, ap);
    va_end(ap);
    c->code = status;
    return status;
}

/* mlipd_connect's error: "<code>: <text>" */
static void set_last_error(int status, const char *fmt, ...) {
    va_list ap;
    int n = snprintf(last_error, ERR_LEN, "%s: ", mlipd_status_name(status));
    va_start(ap, fmt);
    vsnprintf(last_error + n, ERR_LEN - (size_t)n, fmt, ap);
    va_end(ap);
    last_code = status;
}

const char *mlipd_last_error(void) { return last_error; }

int mlipd_last_error_code(void) { return last_code; }

const char *mlipd_error(const mlipd_client *c) {
    if (c == NULL) return "setup: no client (NULL)";
    return c->error;
}

int mlipd_error_code(const mlipd_client *c) { return c == NULL ? MLIPD_E_SETUP : c->code; }

/* ------------------------------------------------------------------ msgpack helpers */

static void pack_str(msgpack_packer *pk, const char *s) {
    size_t n = strlen(s);
    msgpack_pack_str(pk, n);
    msgpack_pack_str_body(pk, s, n);
}

/* {"dtype": dtype, "shape": [dims], "data": <bin>} */
static void pack_array(msgpack_packer *pk, const char *dtype, int ndim, const int64_t *dims,
                       const void *data, size_t nbytes) {
    msgpack_pack_map(pk, 3);
    pack_str(pk, "dtype");
    pack_str(pk, dtype);
    pack_str(pk, "shape");
    msgpack_pack_array(pk, (size_t)ndim);
    for (int i = 0; i < ndim; i++) msgpack_pack_int64(pk, dims[i]);
    pack_str(pk, "data");
    msgpack_pack_bin(pk, nbytes);
    msgpack_pack_bin_body(pk, data, nbytes);
}

static int key_is(const msgpack_object *k, const char *name) {
    size_t n = strlen(name);
    return k->type == MSGPACK_OBJECT_STR && k->via.str.size == n &&
           memcmp(k->via.str.ptr, name, n) == 0;
}

static const msgpack_object *map_get(const msgpack_object *map, const char *name) {
    if (map == NULL || map->type != MSGPACK_OBJECT_MAP) return NULL;
    for (uint32_t i = 0; i < map->via.map.size; i++)
        if (key_is(&map->via.map.ptr[i].key, name)) return &map->via.map.ptr[i].val;
    return NULL;
}

static int as_double(const msgpack_object *o, double *out) {
    if (o == NULL) return 0;
    switch (o->type) {
    case MSGPACK_OBJECT_FLOAT64:
    case MSGPACK_OBJECT_FLOAT32: *out = o->via.f64; return 1;
    case MSGPACK_OBJECT_POSITIVE_INTEGER: *out = (double)o->via.u64; return 1;
    case MSGPACK_OBJECT_NEGATIVE_INTEGER: *out = (double)o->via.i64; return 1;
    default: return 0;
    }
}

static int as_int64(const msgpack_object *o, int64_t *out) {
    if (o == NULL) return 0;
    if (o->type == MSGPACK_OBJECT_POSITIVE_INTEGER && o->via.u64 <= INT64_MAX) {
        *out = (int64_t)o->via.u64;
        return 1;
    }
    if (o->type == MSGPACK_OBJECT_NEGATIVE_INTEGER) {
        *out = o->via.i64;
        return 1;
    }
    return 0;
}

static void copy_str(const msgpack_object *o, char *dst, size_t cap) {
    dst[0] = '\0';
    if (o == NULL || o->type != MSGPACK_OBJECT_STR || cap == 0) return;
    size_t n = o->via.str.size < cap - 1 ? o->via.str.size : cap - 1;
    memcpy(dst, o->via.str.ptr, n);
    dst[n] = '\0';
}

/* A float array of `count` items and the given shape into out (float64). */
static int unpack_floats(mlipd_client *c, const msgpack_object *a, const char *name,
                         int64_t rows, int64_t cols, double *out) {
    const msgpack_object *dtype = map_get(a, "dtype"), *shape = map_get(a, "shape"),
                         *data = map_get(a, "data");
    int64_t r, k;
    if (dtype == NULL || shape == NULL || data == NULL || shape->type != MSGPACK_OBJECT_ARRAY ||
        shape->via.array.size != 2 || data->type != MSGPACK_OBJECT_BIN ||
        !as_int64(&shape->via.array.ptr[0], &r) || !as_int64(&shape->via.array.ptr[1], &k))
        return fail(c, MLIPD_E_PROTOCOL, "reply: %s is not a {dtype, shape, data} array", name);
    if (r != rows || k != cols)
        return fail(c, MLIPD_E_PROTOCOL, "reply: %s has shape [%lld, %lld], expected [%lld, %lld]",
                    name, (long long)r, (long long)k, (long long)rows, (long long)cols);
    size_t items = (size_t)(rows * cols);
    if (key_is(dtype, "<f8") && data->via.bin.size == 8 * items) {
        memcpy(out, data->via.bin.ptr, 8 * items);
    } else if (key_is(dtype, "<f4") && data->via.bin.size == 4 * items) {
        for (size_t i = 0; i < items; i++) {
            float f;
            memcpy(&f, data->via.bin.ptr + 4 * i, 4);
            out[i] = f;
        }
    } else {
        return fail(c, MLIPD_E_PROTOCOL, "reply: %s has an unexpected dtype or byte count", name);
    }
    return MLIPD_OK;
}

/* ------------------------------------------------------------------ transport */

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void release_reply(mlipd_client *c) {
    if (c->have_frame) {
        zmq_msg_close(&c->reply_frame);
        c->have_frame = 0;
    }
}

/* Send without blocking: with no connected peer (server down, a refused CURVE
   handshake) the frame is dropped and the next heartbeat sends it again; a send that
   keeps failing ends as silence, reported after the heartbeat (MLIPD_E_UNAVAILABLE). */
static void send_request(mlipd_client *c) {
    (void)zmq_send(c->sock, c->out.data, c->out.size, ZMQ_DONTWAIT);
}

/* Receive one frame (the last of a multipart message) into c->reply_frame and parse it
   into c->reply. 1: parsed, 0: not msgpack (skipped), <0: error status. */
static int receive(mlipd_client *c) {
    release_reply(c);
    zmq_msg_init(&c->reply_frame);
    c->have_frame = 1;
    for (;;) {
        if (zmq_msg_recv(&c->reply_frame, c->sock, ZMQ_DONTWAIT) < 0)
            return fail(c, MLIPD_E_UNAVAILABLE, "%s: receive failed: %s", c->endpoint,
                        zmq_strerror(errno));
        if (!zmq_msg_more(&c->reply_frame)) break;
    }
    size_t off = 0;
    msgpack_unpack_return r = msgpack_unpack_next(&c->reply, zmq_msg_data(&c->reply_frame),
                                                  zmq_msg_size(&c->reply_frame), &off);
    return r == MSGPACK_UNPACK_SUCCESS ? 1 : 0;
}

/* Send c->out (request `rid`, op `op`) and wait for its reply, resending as heartbeat.
   On MLIPD_OK, c->reply.data is the reply map (ok: true, not pending). */
static int round_trip(mlipd_client *c, const char *op, int64_t rid, double timeout_s,
                      double heartbeat_s) {
    send_request(c);
    double start = now_s(), heard = start, resend_every = heartbeat_s / 4;
    double next_send = start + resend_every;
    char pending[128] = "";
    zmq_pollitem_t item = {c->sock, 0, ZMQ_POLLIN, 0};
    for (;;) {
        double now = now_s();
        if (now - start > timeout_s)
            return fail(c, MLIPD_E_TIMEOUT, "%s: no result for %s #%lld within %g s%s",
                        c->endpoint, op, (long long)rid, timeout_s, pending);
        if (now - heard > heartbeat_s)
            return fail(c, MLIPD_E_UNAVAILABLE,
                        "%s: nothing heard for %g s while waiting for %s #%lld: the server "
                        "is gone", c->endpoint, heartbeat_s, op, (long long)rid);
        double until = next_send;
        if (start + timeout_s < until) until = start + timeout_s;
        if (heard + heartbeat_s < until) until = heard + heartbeat_s;
        long wait_ms = (long)((until - now) * 1000.0);
        if (wait_ms < 1) wait_ms = 1;
        int ready = zmq_poll(&item, 1, wait_ms);
        if (ready < 0) {
            if (errno == EINTR) continue;
            return fail(c, MLIPD_E_UNAVAILABLE, "%s: poll failed: %s", c->endpoint,
                        zmq_strerror(errno));
        }
        if (ready == 0) {
            if (now_s() >= next_send) {
                send_request(c);  /* heartbeat: same id, same socket */
                next_send = now_s() + resend_every;
            }
            continue;
        }
        int got = receive(c);
        if (got < 0) return got;
        const msgpack_object *msg = &c->reply.data;
        if (got == 0 || msg->type != MSGPACK_OBJECT_MAP)
            return fail(c, MLIPD_E_PROTOCOL, "%s: the reply is not a msgpack map", c->endpoint);
        int64_t id;
        const msgpack_object *id_obj = map_get(msg, "id");
        if (as_int64(id_obj, &id) && id != rid) continue;  /* a late reply to an earlier request */
        const msgpack_object *v = map_get(msg, "v"), *ok = map_get(msg, "ok");
        int64_t version;
        if (!as_int64(v, &version) || version != MLIPD_PROTOCOL_VERSION || ok == NULL ||
            ok->type != MSGPACK_OBJECT_BOOLEAN)
            return fail(c, MLIPD_E_PROTOCOL, "%s: the reply is not a version-1 mlipd envelope",
                        c->endpoint);
        if (!ok->via.boolean) {
            const msgpack_object *err = map_get(msg, "error");
            const msgpack_object *code = map_get(err, "code"), *text = map_get(err, "message");
            char message[ERR_LEN - 64];
            copy_str(text, message, sizeof message);
            if (code == NULL || code->type != MSGPACK_OBJECT_STR)
                return fail(c, MLIPD_E_PROTOCOL, "%s: malformed error reply", c->endpoint);
            int status = status_from_code(code->via.str.ptr, code->via.str.size);
            /* the server's own code and text, e.g. "bad_input: structure 0: ..." */
            snprintf(c->error, ERR_LEN, "%.*s: %s", (int)code->via.str.size,
                     code->via.str.ptr, message);
            c->code = status;
            return status;
        }
        const msgpack_object *p = map_get(msg, "pending");
        if (p != NULL && p->type == MSGPACK_OBJECT_BOOLEAN && p->via.boolean) {
            heard = now_s();  /* alive and at work: keep waiting */
            char state[32];
            double waited = 0;
            const msgpack_object *value = map_get(msg, "value");
            copy_str(map_get(value, "state"), state, sizeof state);
            as_double(map_get(value, "waited_s"), &waited);
            snprintf(pending, sizeof pending, " (the server is alive: %s for %.1f s)", state,
                     waited);
            continue;
        }
        c->code = MLIPD_OK;
        c->error[0] = '\0';
        return MLIPD_OK;
    }
}

/* Start a request map with v, id, op and `extra` more keys; returns the id. */
static int64_t begin_request(mlipd_client *c, msgpack_packer *pk, const char *op, int extra) {
    int64_t rid = c->next_id++;
    msgpack_sbuffer_clear(&c->out);
    msgpack_packer_init(pk, &c->out, msgpack_sbuffer_write);
    msgpack_pack_map(pk, (size_t)(3 + extra));
    pack_str(pk, "v");
    msgpack_pack_int(pk, MLIPD_PROTOCOL_VERSION);
    pack_str(pk, "id");
    msgpack_pack_int64(pk, rid);
    pack_str(pk, "op");
    pack_str(pk, op);
    return rid;
}

/* A request without structures (info, ping). */
static int simple_request(mlipd_client *c, const char *op, double timeout_s, double heartbeat_s) {
    msgpack_packer pk;
    int64_t rid = begin_request(c, &pk, op, 0);
    return round_trip(c, op, rid, timeout_s, heartbeat_s);
}

static void read_info(const msgpack_object *v, mlipd_server_info *info) {
    int64_t i;
    memset(info, 0, sizeof *info);
    copy_str(map_get(v, "version"), info->version, sizeof info->version);
    copy_str(map_get(v, "model"), info->model, sizeof info->model);
    copy_str(map_get(v, "device"), info->device, sizeof info->device);
    copy_str(map_get(v, "dtype"), info->dtype, sizeof info->dtype);
    info->protocol = as_int64(map_get(v, "protocol"), &i) ? (int)i : 0;
    info->n_layers = as_int64(map_get(v, "n_layers"), &i) ? (int)i : 0;
    info->ranks = as_int64(map_get(v, "ranks"), &i) ? (int)i : 0;
    info->max_request_atoms = as_int64(map_get(v, "max_request_atoms"), &i) ? i : -1;
    info->max_structures = as_int64(map_get(v, "max_structures"), &i) ? i : -1;
    if (!as_double(map_get(v, "cutoff"), &info->cutoff)) info->cutoff = NAN;
    if (!as_double(map_get(v, "request_timeout_s"), &info->request_timeout_s))
        info->request_timeout_s = NAN;
    const msgpack_object *sp = map_get(v, "species");
    info->n_species = -1;
    if (sp != NULL && sp->type == MSGPACK_OBJECT_ARRAY) {
        info->n_species = 0;
        for (uint32_t k = 0; k < sp->via.array.size && info->n_species < 118; k++)
            if (as_int64(&sp->via.array.ptr[k], &i)) info->species[info->n_species++] = (int)i;
    }
}

int mlipd_info(mlipd_client *c, mlipd_server_info *info) {
    if (c == NULL || c->sock == NULL) return MLIPD_E_SETUP;
    int rc = simple_request(c, "info", c->timeout_s, c->heartbeat_s);
    if (rc != MLIPD_OK) return rc;
    const msgpack_object *v = map_get(&c->reply.data, "value");
    if (v == NULL || v->type != MSGPACK_OBJECT_MAP)
        return fail(c, MLIPD_E_PROTOCOL, "%s: info reply has no value", c->endpoint);
    read_info(v, &c->info);
    if (info != NULL) *info = c->info;
    return MLIPD_OK;
}

int mlipd_ping(mlipd_client *c) {
    if (c == NULL || c->sock == NULL) return MLIPD_E_SETUP;
    return simple_request(c, "ping", c->timeout_s, c->heartbeat_s);
}

int mlipd_set_heartbeat(mlipd_client *c, double heartbeat_s) {
    if (c == NULL) return MLIPD_E_SETUP;
    if (!(heartbeat_s > 0)) return fail(c, MLIPD_E_SETUP, "heartbeat_s must be > 0");
    c->heartbeat_s = heartbeat_s;
    return MLIPD_OK;
}

/* ------------------------------------------------------------------ connect and close */

/* A public or secret Z85 key from a pyzmq certificate file ("public-key = \"...\""). */
static int read_key(const char *dir, const char *file, const char *field, char out[41]) {
    char path[4096], line[512];
    snprintf(path, sizeof path, "%s/%s", dir, file);
    FILE *f = fopen(path, "r");
    if (f == NULL) {
        set_last_error(MLIPD_E_SETUP, "cannot read CURVE certificate %s: %s", path, strerror(errno));
        return 0;
    }
    int found = 0;
    while (!found && fgets(line, sizeof line, f) != NULL) {
        char *p = strstr(line, field);
        if (p == NULL || (p = strchr(p, '"')) == NULL) continue;
        char *end = strchr(p + 1, '"');
        if (end != NULL && end - (p + 1) == Z85_KEY_LEN) {
            memcpy(out, p + 1, Z85_KEY_LEN);
            out[Z85_KEY_LEN] = '\0';
            found = 1;
        }
    }
    fclose(f);
    if (!found) set_last_error(MLIPD_E_SETUP, "%s: holds no %s", path, field);
    return found;
}

static int apply_curve(void *sock, const char *key_dir) {
    char server_public[41], public_key[41], secret_key[41];
    if (!read_key(key_dir, "server.key", "public-key", server_public) ||
        !read_key(key_dir, "client.key_secret", "public-key", public_key) ||
        !read_key(key_dir, "client.key_secret", "secret-key", secret_key))
        return 0;
    if (zmq_setsockopt(sock, ZMQ_CURVE_SERVERKEY, server_public, Z85_KEY_LEN) != 0 ||
        zmq_setsockopt(sock, ZMQ_CURVE_PUBLICKEY, public_key, Z85_KEY_LEN) != 0 ||
        zmq_setsockopt(sock, ZMQ_CURVE_SECRETKEY, secret_key, Z85_KEY_LEN) != 0) {
        set_last_error(MLIPD_E_SETUP, "CURVE keys from %s refused by libzmq: %s (was it built with CURVE?)",
                       key_dir, zmq_strerror(errno));
        return 0;
    }
    return 1;
}

/* "mlipd-" + 12 random bytes, as the Python client: our identity for the server's
   ledger of request ids, kept across reconnects of this socket. */
static void routing_id(unsigned char id[18]) {
    memcpy(id, "mlipd-", 6);
    FILE *f = fopen("/dev/urandom", "rb");
    size_t got = f != NULL ? fread(id + 6, 1, 12, f) : 0;
    if (f != NULL) fclose(f);
    if (got != 12) {  /* no /dev/urandom: time, pid and an address are unique enough */
        uint64_t x = (uint64_t)(now_s() * 1e9) ^ ((uint64_t)getpid() << 32) ^ (uintptr_t)id;
        for (int i = 0; i < 12; i++) {
            x = x * 6364136223846793005ULL + 1442695040888963407ULL;
            id[6 + i] = (unsigned char)(x >> 56);
        }
    }
}

static int endpoint_form_ok(const char *endpoint) {
    if (strncmp(endpoint, "tcp://", 6) == 0) return strrchr(endpoint + 6, ':') != NULL;
    if (strncmp(endpoint, "ipc://", 6) == 0) return endpoint[6] != '\0' && endpoint[6] != '@';
    return 0;
}

static mlipd_client *connect_impl(const char *endpoint, double timeout_s, const char *key_dir) {
    if (endpoint == NULL) {
        set_last_error(MLIPD_E_SETUP, "no endpoint given (NULL)");
        return NULL;
    }
    if (!endpoint_form_ok(endpoint)) {
        if (strstr(endpoint, "://") == NULL)
            set_last_error(MLIPD_E_SETUP, "%s: not a ZeroMQ endpoint; expected tcp://HOST:PORT or ipc:///PATH "
                           "(did you mean tcp://%s?)", endpoint, endpoint);
        else
            set_last_error(MLIPD_E_SETUP, "%s: not a ZeroMQ endpoint; expected tcp://HOST:PORT or ipc:///PATH",
                           endpoint);
        return NULL;
    }
    if (!(timeout_s > 0)) {
        set_last_error(MLIPD_E_SETUP, "%s: timeout_s must be > 0", endpoint);
        return NULL;
    }
    mlipd_client *c = calloc(1, sizeof *c);
    if (c == NULL || (c->endpoint = strdup(endpoint)) == NULL) {
        free(c);
        set_last_error(MLIPD_E_SETUP, "%s: out of memory", endpoint);
        return NULL;
    }
    c->timeout_s = timeout_s;
    c->heartbeat_s = timeout_s < DEFAULT_HEARTBEAT_S ? timeout_s : DEFAULT_HEARTBEAT_S;
    c->next_id = 1;
    c->curve = key_dir != NULL;
    msgpack_sbuffer_init(&c->out);
    msgpack_unpacked_init(&c->reply);
    c->ctx = zmq_ctx_new();
    c->sock = c->ctx != NULL ? zmq_socket(c->ctx, ZMQ_DEALER) : NULL;
    if (c->sock == NULL) {
        set_last_error(MLIPD_E_SETUP, "%s: cannot create a ZeroMQ socket: %s", endpoint, zmq_strerror(errno));
        mlipd_close(c);
        return NULL;
    }
    int zero = 0, one = 1;
    unsigned char id[18];
    routing_id(id);
    zmq_setsockopt(c->sock, ZMQ_LINGER, &zero, sizeof zero);
    zmq_setsockopt(c->sock, ZMQ_IPV6, &one, sizeof one);
    zmq_setsockopt(c->sock, ZMQ_ROUTING_ID, id, sizeof id);
    if (key_dir != NULL && !apply_curve(c->sock, key_dir)) {
        mlipd_close(c);
        return NULL;
    }
    if (zmq_connect(c->sock, endpoint) != 0) {
        set_last_error(MLIPD_E_SETUP, "%s: cannot connect: %s", endpoint, zmq_strerror(errno));
        mlipd_close(c);
        return NULL;
    }
    /* the first answer, within timeout_s: info is never 'pending', so silence means
       nothing is there (or it refused our CURVE key) */
    int rc = simple_request(c, "info", timeout_s, timeout_s);
    const msgpack_object *v = rc == MLIPD_OK ? map_get(&c->reply.data, "value") : NULL;
    if (rc == MLIPD_E_TIMEOUT || rc == MLIPD_E_UNAVAILABLE) {
        set_last_error(MLIPD_E_UNAVAILABLE, "%s: no mlipd server answered within %g s (is `mlipd "
                       "serve --zmq %s` running?%s)", endpoint, timeout_s, endpoint,
                       key_dir ? " or it refused our CURVE key" : "");
        mlipd_close(c);
        return NULL;
    }
    if (rc != MLIPD_OK || v == NULL || v->type != MSGPACK_OBJECT_MAP) {
        if (rc != MLIPD_OK) {  /* the server's own error, code and text */
            snprintf(last_error, ERR_LEN, "%s", c->error);
            last_code = rc;
        } else {
            set_last_error(MLIPD_E_PROTOCOL, "%s: info reply has no value", endpoint);
        }
        mlipd_close(c);
        return NULL;
    }
    read_info(v, &c->info);
    release_reply(c);
    return c;
}

mlipd_client *mlipd_connect(const char *endpoint, double timeout_s) {
    return connect_impl(endpoint, timeout_s, NULL);
}

mlipd_client *mlipd_connect_curve(const char *endpoint, double timeout_s, const char *key_dir) {
    if (key_dir == NULL) {
        set_last_error(MLIPD_E_SETUP, "%s: no CURVE key directory given (NULL)", endpoint ? endpoint : "?");
        return NULL;
    }
    return connect_impl(endpoint, timeout_s, key_dir);
}

void mlipd_close(mlipd_client *c) {
    if (c == NULL) return;
    release_reply(c);
    msgpack_unpacked_destroy(&c->reply);
    msgpack_sbuffer_destroy(&c->out);
    if (c->sock != NULL) zmq_close(c->sock);
    if (c->ctx != NULL) zmq_ctx_term(c->ctx);
    free(c->endpoint);
    free(c);
}

/* ------------------------------------------------------------------ compute */

static int check_limits(mlipd_client *c, int64_t atoms, int n_structures) {
    if (c->info.max_request_atoms >= 0 && atoms > c->info.max_request_atoms)
        return fail(c, MLIPD_E_TOO_LARGE, "%lld atoms exceed the server's limit of %lld per "
                    "request (--max-request-atoms)", (long long)atoms,
                    (long long)c->info.max_request_atoms);
    if (c->info.max_structures >= 0 && n_structures > c->info.max_structures)
        return fail(c, MLIPD_E_TOO_LARGE, "%d structures exceed the server's limit of %lld",
                    n_structures, (long long)c->info.max_structures);
    return MLIPD_OK;
}

static void pack_structure(msgpack_packer *pk, int n, const int *numbers,
                           const double *positions, const double *cell, const int *pbc) {
    static const double zeros[9] = {0};
    int64_t dims[2] = {n, 3}, cell_dims[2] = {3, 3};
    msgpack_pack_map(pk, 4);
    pack_str(pk, "numbers");
    pack_array(pk, "<i4", 1, dims, numbers, 4 * (size_t)n);
    pack_str(pk, "positions");
    pack_array(pk, "<f8", 2, dims, positions, 24 * (size_t)n);
    pack_str(pk, "cell");
    pack_array(pk, "<f8", 2, cell_dims, cell != NULL ? cell : zeros, 72);
    pack_str(pk, "pbc");
    msgpack_pack_array(pk, 3);
    for (int k = 0; k < 3; k++) {
        int periodic = pbc != NULL ? pbc[k] != 0 : cell != NULL;
        if (periodic) msgpack_pack_true(pk);
        else msgpack_pack_false(pk);
    }
}

/* Room for the whole request up front: the packer's writes then never reallocate (and
   cannot fail half-way). */
static int reserve(mlipd_client *c, int64_t atoms, int n_structures) {
    size_t need = (size_t)atoms * 28 + (size_t)n_structures * 256 + 256;
    if (c->out.alloc >= need) return MLIPD_OK;
    char *p = realloc(c->out.data, need);
    if (p == NULL)
        return fail(c, MLIPD_E_SETUP, "out of memory for a request of %lld atoms",
                    (long long)atoms);
    c->out.data = p;
    c->out.alloc = need;
    return MLIPD_OK;
}

static int compute_impl(mlipd_client *c, const char *op, int n_structures, const int *n_atoms,
                        const int *numbers, const double *positions, const double *cells,
                        const int *pbc, double *energies, double *forces, double *virials) {
    if (c == NULL) return MLIPD_E_SETUP;
    if (c->sock == NULL) return fail(c, MLIPD_E_SETUP, "client is closed");
    if (n_structures < 1 || n_atoms == NULL || numbers == NULL || positions == NULL ||
        energies == NULL || forces == NULL)
        return fail(c, MLIPD_E_BAD_INPUT, "need n_structures >= 1 and n_atoms, numbers, "
                    "positions, energies, forces (not NULL)");
    int64_t total = 0;
    for (int s = 0; s < n_structures; s++) {
        if (n_atoms[s] < 1)
            return fail(c, MLIPD_E_BAD_INPUT, "structure %d: %d atoms (need >= 1)", s, n_atoms[s]);
        total += n_atoms[s];
    }
    int rc = check_limits(c, total, n_structures);  /* before anything is allocated */
    if (rc != MLIPD_OK || (rc = reserve(c, total, n_structures)) != MLIPD_OK) return rc;
    msgpack_packer pk;
    int64_t rid = begin_request(c, &pk, op, 2);
    pack_str(&pk, "structures");
    msgpack_pack_array(&pk, (size_t)n_structures);
    int64_t first = 0;
    for (int s = 0; s < n_structures; s++) {
        pack_structure(&pk, n_atoms[s], numbers + first, positions + 3 * first,
                       cells != NULL ? cells + 9 * s : NULL, pbc != NULL ? pbc + 3 * s : NULL);
        first += n_atoms[s];
    }
    pack_str(&pk, "virial");
    if (virials != NULL) msgpack_pack_true(&pk);
    else msgpack_pack_false(&pk);
    rc = round_trip(c, op, rid, c->timeout_s, c->heartbeat_s);
    if (rc != MLIPD_OK) return rc;
    const msgpack_object *results = map_get(&c->reply.data, "results");
    if (results == NULL || results->type != MSGPACK_OBJECT_ARRAY ||
        results->via.array.size != (uint32_t)n_structures)
        return fail(c, MLIPD_E_PROTOCOL, "%s: reply has no results for %d structure(s)",
                    c->endpoint, n_structures);
    first = 0;
    for (int s = 0; s < n_structures; s++) {
        const msgpack_object *r = &results->via.array.ptr[s];
        if (!as_double(map_get(r, "energy"), &energies[s]))
            return fail(c, MLIPD_E_PROTOCOL, "reply: result %d has no energy", s);
        rc = unpack_floats(c, map_get(r, "forces"), "forces", n_atoms[s], 3, forces + 3 * first);
        if (rc != MLIPD_OK) return rc;
        if (virials != NULL) {
            const msgpack_object *w = map_get(r, "virial");
            if (w == NULL || w->type == MSGPACK_OBJECT_NIL) {
                for (int k = 0; k < 9; k++) virials[9 * s + k] = NAN;  /* none: not 3D-periodic */
            } else if ((rc = unpack_floats(c, w, "virial", 3, 3, virials + 9 * s)) != MLIPD_OK) {
                return rc;
            }
        }
        first += n_atoms[s];
    }
    release_reply(c);
    return MLIPD_OK;
}

int mlipd_compute(mlipd_client *c, int n_atoms, const int *numbers, const double *positions,
                  const double *cell, const int *pbc,
                  double *energy, double *forces, double *virial) {
    return compute_impl(c, "compute", 1, &n_atoms, numbers, positions, cell, pbc, energy,
                        forces, virial);
}

int mlipd_compute_batch(mlipd_client *c, int n_structures, const int *n_atoms,
                        const int *numbers, const double *positions, const double *cells,
                        const int *pbc, double *energies, double *forces, double *virials) {
    return compute_impl(c, "batch", n_structures, n_atoms, numbers, positions, cells, pbc,
                        energies, forces, virials);
}
