/* mlipd_probe_c: structures from a file through the C client, results to a file; what the
 * tests and `mlipd bench clients` drive (the same program in Fortran: probe.f90).
 *
 *   mlipd_probe_c ENDPOINT TIMEOUT_S MODE IN OUT [KEY_DIR]
 *
 * MODE: single (one mlipd_compute per structure), batch (one mlipd_compute_batch), or
 * repeat:R (each structure R times, with wall seconds per call printed: `seconds S`).
 * IN (little-endian): int32 count, then per structure int32 n, int32 numbers[n],
 * float64 positions[3n], int32 has_cell, float64 cell[9], int32 pbc[3].
 * OUT: per structure float64 energy, forces[3n], virial[9] (NaN: none).
 * Prints `ok`, or `error CODE TEXT` for the first failed call (exit 1); a failed
 * connect prints `connect CODE TEXT` (exit 2). MLIPD_HEARTBEAT_S in the environment sets
 * the client's heartbeat (mlipd_set_heartbeat).
 */
#include <mlipd_client.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct {
    int n, has_cell, pbc[3];
    int *numbers;
    double *positions, cell[9];
} structure;

static int read_all(FILE *f, void *p, size_t size, size_t count) {
    return fread(p, size, count, f) == count;
}

static structure *load(const char *path, int *count, long *total) {
    FILE *f = fopen(path, "rb");
    if (f == NULL || !read_all(f, count, 4, 1) || *count < 1) return NULL;
    structure *s = calloc((size_t)*count, sizeof *s);
    *total = 0;
    for (int k = 0; k < *count; k++) {
        if (!read_all(f, &s[k].n, 4, 1) || s[k].n < 1) return NULL;
        s[k].numbers = malloc(sizeof(int) * (size_t)s[k].n);
        s[k].positions = malloc(sizeof(double) * 3 * (size_t)s[k].n);
        if (!read_all(f, s[k].numbers, 4, (size_t)s[k].n) ||
            !read_all(f, s[k].positions, 8, 3 * (size_t)s[k].n) ||
            !read_all(f, &s[k].has_cell, 4, 1) || !read_all(f, s[k].cell, 8, 9) ||
            !read_all(f, s[k].pbc, 4, 3))
            return NULL;
        *total += s[k].n;
    }
    fclose(f);
    return s;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int main(int argc, char **argv) {
    if (argc < 6) {
        fprintf(stderr, "usage: %s ENDPOINT TIMEOUT_S MODE IN OUT [KEY_DIR]\n", argv[0]);
        return 2;
    }
    int count;
    long total;
    structure *s = load(argv[4], &count, &total);
    if (s == NULL) {
        fprintf(stderr, "cannot read %s\n", argv[4]);
        return 2;
    }
    double timeout_s = atof(argv[2]);
    mlipd_client *c = argc > 6 ? mlipd_connect_curve(argv[1], timeout_s, argv[6])
                               : mlipd_connect(argv[1], timeout_s);
    if (c == NULL) {
        printf("connect %d %s\n", mlipd_last_error_code(), mlipd_last_error());
        return 2;
    }
    const char *heartbeat = getenv("MLIPD_HEARTBEAT_S");
    if (heartbeat != NULL && mlipd_set_heartbeat(c, atof(heartbeat)) != MLIPD_OK) {
        printf("error %d %s\n", mlipd_error_code(c), mlipd_error(c));
        return 1;
    }
    double *energy = malloc(sizeof(double) * (size_t)count);
    double *forces = malloc(sizeof(double) * 3 * (size_t)total);
    double *virial = malloc(sizeof(double) * 9 * (size_t)count);
    int rc = MLIPD_OK;
    if (strcmp(argv[3], "batch") == 0) {
        int *n = malloc(sizeof(int) * (size_t)count), *numbers = malloc(sizeof(int) * total);
        int *pbc = malloc(sizeof(int) * 3 * (size_t)count);
        double *pos = malloc(sizeof(double) * 3 * total), *cells = malloc(72 * (size_t)count);
        long first = 0;
        for (int k = 0; k < count; k++) {
            n[k] = s[k].n;
            memcpy(numbers + first, s[k].numbers, sizeof(int) * (size_t)s[k].n);
            memcpy(pos + 3 * first, s[k].positions, 24 * (size_t)s[k].n);
            memcpy(cells + 9 * k, s[k].cell, 72);
            memcpy(pbc + 3 * k, s[k].pbc, sizeof(int) * 3);
            first += s[k].n;
        }
        rc = mlipd_compute_batch(c, count, n, numbers, pos, cells, pbc, energy, forces, virial);
    } else {
        int repeats = strncmp(argv[3], "repeat:", 7) == 0 ? atoi(argv[3] + 7) : 1;
        long first = 0;
        for (int k = 0; k < count && rc == MLIPD_OK; k++) {
            double t0 = now_s();
            for (int r = 0; r < repeats && rc == MLIPD_OK; r++) {
                if (repeats > 1) s[k].positions[0] += r % 2 ? -1e-6 : 1e-6;  /* new each call */
                rc = mlipd_compute(c, s[k].n, s[k].numbers, s[k].positions,
                                   s[k].has_cell ? s[k].cell : NULL, s[k].pbc, &energy[k],
                                   forces + 3 * first, virial + 9 * k);
            }
            if (repeats > 1) printf("seconds %.9f\n", (now_s() - t0) / repeats);
            first += s[k].n;
        }
    }
    if (rc != MLIPD_OK) {
        printf("error %d %s\n", rc, mlipd_error(c));
        mlipd_close(c);
        return 1;
    }
    FILE *out = fopen(argv[5], "wb");
    long first = 0;
    for (int k = 0; k < count; k++) {
        fwrite(&energy[k], 8, 1, out);
        fwrite(forces + 3 * first, 8, 3 * (size_t)s[k].n, out);
        fwrite(virial + 9 * k, 8, 9, out);
        first += s[k].n;
    }
    fclose(out);
    printf("ok\n");
    mlipd_close(c);
    return 0;
}
