/* mlipd_client.h: a C client of `mlipd serve` over ZeroMQ (protocol: docs/protocol.md).
 *
 *   mlipd_client *c = mlipd_connect("tcp://127.0.0.1:5555", 60.0);
 *   if (!c) { fprintf(stderr, "%s\n", mlipd_last_error()); return 1; }
 *   double e, f[3 * N], w[9];
 *   if (mlipd_compute(c, N, numbers, positions, cell, pbc, &e, f, w) != MLIPD_OK)
 *       fprintf(stderr, "%s\n", mlipd_error(c));
 *   mlipd_close(c);
 *
 * Units: Å, eV, eV/Å. Arrays are row-major: positions and forces n*3 (x, y, z of atom 0,
 * then atom 1, ...); cell 9, its rows the lattice vectors (ASE's convention); the virial
 * 9, -dE/dstrain in eV (stress = -virial / volume).
 *
 * Behaviour (the same as mlipd.client.Client in Python):
 * - mlipd_connect asks the server for `info` and fails (NULL) when nothing answers within
 *   timeout_s, with mlipd_last_error() naming the endpoint. `info` gives the server's
 *   limits: a request over them fails with MLIPD_E_TOO_LARGE before it is sent.
 * - While a call waits it resends its request (same id, same socket: the server never
 *   computes an id twice) every heartbeat/4. A server that answers `pending` is alive
 *   and the call keeps waiting, up to timeout_s; one silent for the heartbeat
 *   (default min(10 s, timeout_s)) is gone: MLIPD_E_UNAVAILABLE.
 * - Every failure is a negative MLIPD_E_* code mirroring the wire's error codes, with
 *   the server's message in mlipd_error(c) ("bad_input: structure 0: positions contain
 *   NaN or infinity"). A failed call leaves the client usable.
 *
 * Threads: one client per thread (a ZeroMQ socket must not be shared). No global state
 * besides the last-error text of mlipd_connect, which is per thread.
 * Little-endian hosts only (the wire's arrays are little-endian; checked at compile time).
 */
#ifndef MLIPD_CLIENT_H
#define MLIPD_CLIENT_H

#ifdef __cplusplus
extern "C" {
#endif

#define MLIPD_CLIENT_VERSION "0.1.0"
#define MLIPD_PROTOCOL_VERSION 1

/* Return codes: 0 or one of these, each a wire code of docs/protocol.md ("Error codes"). */
enum mlipd_status {
    MLIPD_OK = 0,
    MLIPD_E_BAD_INPUT = -1,       /* bad_input: a field or structure the server refuses
                                     (NaN, atomic number outside 1..118, atoms too close) */
    MLIPD_E_TOO_LARGE = -2,       /* too_large: over the server's limits (known from info:
                                     refused before sending) */
    MLIPD_E_UNKNOWN_SPECIES = -3, /* unknown_species: an element the model does not know */
    MLIPD_E_BUSY = -4,            /* busy: queue full, or the server is shutting down */
    MLIPD_E_TIMEOUT = -5,         /* deadline: no result within timeout_s (the server is
                                     alive), or the server's --request-timeout passed */
    MLIPD_E_CALCULATION = -6,     /* calculation: the engine failed on this request */
    MLIPD_E_UNAVAILABLE = -7,     /* unavailable: nothing answered, or the server went silent */
    MLIPD_E_PROTOCOL = -8,        /* protocol: a frame that is not a version-1 message */
    MLIPD_E_INTERNAL = -9,        /* internal: a bug on the server (it keeps serving) */
    MLIPD_E_SETUP = -10,          /* client side: bad endpoint, unreadable CURVE keys,
                                     out of memory, a closed client, a NULL argument */
};

typedef struct mlipd_client mlipd_client;

/* What the server says about itself (the `info` op). */
typedef struct mlipd_server_info {
    char version[32];            /* mlipd's version */
    int protocol;                /* 1 */
    char model[256];             /* e.g. "chgnet" */
    double cutoff;               /* Å */
    int n_layers;
    int n_species;               /* -1: any element; else the count in species[] */
    int species[118];            /* atomic numbers the model knows, ascending */
    int ranks;                   /* ranks each structure is partitioned across */
    char device[64];             /* e.g. "cpu", "cuda:0" */
    char dtype[16];              /* "float32" or "float64" */
    long long max_request_atoms; /* atoms per request, all structures together */
    long long max_structures;    /* structures per batch request */
    double request_timeout_s;    /* the server's own deadline per request */
} mlipd_server_info;

/* NULL on failure; then mlipd_last_error() says why. timeout_s bounds every call. */
mlipd_client *mlipd_connect(const char *endpoint, double timeout_s);

/* The same over CURVE, with the files `mlipd keygen DIR` writes: DIR/client.key_secret
   (this client's pair) and DIR/server.key (the server's public key). */
mlipd_client *mlipd_connect_curve(const char *endpoint, double timeout_s, const char *key_dir);

/* positions n*3 and cell 9 in Å, row-major (cell rows are lattice vectors, NULL = open
   boundaries), pbc 3 ints (NULL: all periodic with a cell, none without); outputs:
   energy eV, forces n*3 eV/Å, virial 9 eV (NULL = not wanted). The virial is NaN where
   the server has none (a cell not periodic in all three directions). Returns 0, or a
   negative MLIPD_E_* code. */
int mlipd_compute(mlipd_client *c, int n_atoms, const int *numbers, const double *positions,
                  const double *cell, const int *pbc,
                  double *energy, double *forces, double *virial);

/* Several structures in one request (one engine call where they fit). n_atoms[s] atoms
   each; numbers, positions and forces concatenated in structure order; cells 9 per
   structure (NULL: all open), pbc 3 per structure (NULL: as for mlipd_compute);
   energies 1, virials 9 per structure (virials NULL: not wanted). */
int mlipd_compute_batch(mlipd_client *c, int n_structures, const int *n_atoms,
                        const int *numbers, const double *positions, const double *cells,
                        const int *pbc, double *energies, double *forces, double *virials);

/* Ask the server for `info` again (mlipd_connect already did once). */
int mlipd_info(mlipd_client *c, mlipd_server_info *info);

/* Liveness: 0 when the server answers `ping`. */
int mlipd_ping(mlipd_client *c);

/* The longest silence from the server before it counts as gone (default min(10 s,
   timeout_s)); must be > 0. */
int mlipd_set_heartbeat(mlipd_client *c, double heartbeat_s);

const char *mlipd_error(const mlipd_client *c); /* last error of this client: code and text */
int mlipd_error_code(const mlipd_client *c);    /* its MLIPD_E_* code (0: none) */
const char *mlipd_last_error(void);             /* for a failed mlipd_connect (per thread) */
int mlipd_last_error_code(void);                /* its MLIPD_E_* code (per thread) */
const char *mlipd_status_name(int status);      /* "ok", "bad_input", "too_large", ... */
void mlipd_close(mlipd_client *c);              /* NULL is fine */

#ifdef __cplusplus
}
#endif

#endif /* MLIPD_CLIENT_H */
