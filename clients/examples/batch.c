/* mlipd_batch_c: an energy-volume curve of diamond silicon in ONE batch request (the
 * server evaluates the structures in one engine call), with the pressure from each
 * virial beside the slope of the curve.
 *
 *   mlipd_batch_c ENDPOINT [POINTS=7]
 */
#include <mlipd_client.h>

#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s ENDPOINT [POINTS]\n", argv[0]);
        return 2;
    }
    int points = argc > 2 ? atoi(argv[2]) : 7;
    if (points < 2 || points > 100) {
        fprintf(stderr, "POINTS must be 2..100\n");
        return 2;
    }
    static const double frac[8][3] = {{0, 0, 0}, {0, .5, .5}, {.5, 0, .5}, {.5, .5, 0},
                                      {.25, .25, .25}, {.25, .75, .75}, {.75, .25, .75},
                                      {.75, .75, .25}};
    int *n = malloc(sizeof(int) * points), *numbers = malloc(sizeof(int) * 8 * points);
    double *x = malloc(sizeof(double) * 24 * points), *cells = calloc(9 * points, sizeof(double));
    double *energies = malloc(sizeof(double) * points), *forces = malloc(sizeof(double) * 24 * points);
    double *virials = malloc(sizeof(double) * 9 * points);
    for (int s = 0; s < points; s++) {
        double a = 5.431 * (0.96 + 0.08 * s / (points - 1));  /* ±4% around equilibrium */
        n[s] = 8;
        cells[9 * s] = cells[9 * s + 4] = cells[9 * s + 8] = a;
        for (int i = 0; i < 8; i++) {
            numbers[8 * s + i] = 14;
            for (int k = 0; k < 3; k++) x[24 * s + 3 * i + k] = frac[i][k] * a;
        }
    }
    mlipd_client *c = mlipd_connect(argv[1], 600.0);
    if (c == NULL) {
        fprintf(stderr, "%s\n", mlipd_last_error());
        return 1;
    }
    if (mlipd_compute_batch(c, points, n, numbers, x, cells, NULL, energies, forces, virials)
        != MLIPD_OK) {
        fprintf(stderr, "%s\n", mlipd_error(c));
        mlipd_close(c);
        return 1;
    }
    printf("# V (Å³/atom)   E (eV/atom)    P from virial (GPa)   P = -dE/dV (GPa)\n");
    for (int s = 0; s < points; s++) {
        double a = cells[9 * s], volume = a * a * a;
        double p = (virials[9 * s] + virials[9 * s + 4] + virials[9 * s + 8]) / (3 * volume);
        double slope = 0;  /* central differences of E(V), one-sided at the ends */
        int lo = s > 0 ? s - 1 : s, hi = s < points - 1 ? s + 1 : s;
        double vlo = cells[9 * lo] * cells[9 * lo] * cells[9 * lo];
        double vhi = cells[9 * hi] * cells[9 * hi] * cells[9 * hi];
        slope = (energies[hi] - energies[lo]) / (vhi - vlo);
        printf("%12.4f %14.6f %18.3f %18.3f\n", volume / 8, energies[s] / 8, p * 160.21766,
               -slope * 160.21766);
    }
    mlipd_close(c);
    return 0;
}
