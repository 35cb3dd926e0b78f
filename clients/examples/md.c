/* mlipd_md_c: velocity-Verlet NVE molecular dynamics of diamond silicon (64 atoms),
 * forces from a running `mlipd serve` through the C client. Prints the energies of every
 * step and how well the total energy is conserved.
 *
 *   mlipd serve --model chgnet --zmq tcp://127.0.0.1:5555 &
 *   mlipd_md_c tcp://127.0.0.1:5555 [STEPS=20] [DT_FS=1.0] [T_K=300]
 *
 * Units: Å, eV, fs, amu. The same run in Fortran: md.f90.
 */
#include <mlipd_client.h>

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#define N_ATOMS 64
#define MASS_SI 28.0855                  /* amu */
#define A_SI 5.431                       /* Å, diamond lattice constant */
#define KB 8.617333262e-5                /* eV/K */
#define ACCEL 9.64853321e-3              /* (eV/Å)/amu in Å/fs² */
#define EKIN 103.6426965                 /* amu Å²/fs² in eV */

/* a reproducible normal deviate (xorshift64* and Box-Muller), the same as md.f90's */
static uint64_t state = 88172645463325252ULL;
static double uniform(void) {
    state ^= state >> 12;
    state ^= state << 25;
    state ^= state >> 27;
    return ((state * 2685821657736338717ULL) >> 11) * (1.0 / 9007199254740992.0);
}
static double normal(void) {
    double u = uniform(), v = uniform();
    return sqrt(-2.0 * log(1.0 - u)) * cos(2.0 * M_PI * v);
}

static double kinetic(const double *v) {
    double sum = 0;
    for (int i = 0; i < 3 * N_ATOMS; i++) sum += v[i] * v[i];
    return 0.5 * MASS_SI * sum * EKIN;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s ENDPOINT [STEPS] [DT_FS] [T_K]\n", argv[0]);
        return 2;
    }
    int steps = argc > 2 ? atoi(argv[2]) : 20;
    double dt = argc > 3 ? atof(argv[3]) : 1.0, temperature = argc > 4 ? atof(argv[4]) : 300.0;
    static const double basis[8][3] = {{0, 0, 0}, {0, .5, .5}, {.5, 0, .5}, {.5, .5, 0},
                                       {.25, .25, .25}, {.25, .75, .75}, {.75, .25, .75},
                                       {.75, .75, .25}};
    int numbers[N_ATOMS], pbc[3] = {1, 1, 1};
    double x[3 * N_ATOMS], v[3 * N_ATOMS], f[3 * N_ATOMS], cell[9] = {0}, virial[9], energy;
    int i = 0;
    for (int a = 0; a < 2; a++)
        for (int b = 0; b < 2; b++)
            for (int c = 0; c < 2; c++)
                for (int k = 0; k < 8; k++, i++) {
                    numbers[i] = 14;
                    x[3 * i] = (a + basis[k][0]) * A_SI;
                    x[3 * i + 1] = (b + basis[k][1]) * A_SI;
                    x[3 * i + 2] = (c + basis[k][2]) * A_SI;
                }
    cell[0] = cell[4] = cell[8] = 2 * A_SI;
    /* Maxwell-Boltzmann at 2T (half goes into potential energy), no net momentum */
    double sigma = sqrt(KB * 2 * temperature / (MASS_SI * EKIN)), mean[3] = {0, 0, 0};
    for (i = 0; i < 3 * N_ATOMS; i++) {
        v[i] = sigma * normal();
        mean[i % 3] += v[i] / N_ATOMS;
    }
    for (i = 0; i < 3 * N_ATOMS; i++) v[i] -= mean[i % 3];

    mlipd_client *client = mlipd_connect(argv[1], 600.0);
    if (client == NULL) {
        fprintf(stderr, "%s\n", mlipd_last_error());
        return 1;
    }
    if (mlipd_compute(client, N_ATOMS, numbers, x, cell, pbc, &energy, f, virial) != MLIPD_OK) {
        fprintf(stderr, "%s\n", mlipd_error(client));
        mlipd_close(client);
        return 1;
    }
    double e0 = energy + kinetic(v), worst = 0;
    printf("# step   E_pot (eV)        E_kin (eV)     E_tot (eV)         pressure (GPa)\n");
    for (int step = 0; step <= steps; step++) {
        if (step > 0) {
            for (i = 0; i < 3 * N_ATOMS; i++) {
                v[i] += 0.5 * dt * f[i] / MASS_SI * ACCEL;
                x[i] += dt * v[i];
            }
            if (mlipd_compute(client, N_ATOMS, numbers, x, cell, pbc, &energy, f, virial)
                != MLIPD_OK) {
                fprintf(stderr, "step %d: %s\n", step, mlipd_error(client));
                mlipd_close(client);
                return 1;
            }
            for (i = 0; i < 3 * N_ATOMS; i++) v[i] += 0.5 * dt * f[i] / MASS_SI * ACCEL;
        }
        double ek = kinetic(v), volume = 8 * A_SI * A_SI * A_SI;
        /* P = (2 E_kin + trace(virial)) / 3V, eV/Å³ -> GPa */
        double p = (2 * ek + virial[0] + virial[4] + virial[8]) / (3 * volume) * 160.21766;
        if (fabs(energy + ek - e0) > worst) worst = fabs(energy + ek - e0);
        printf("%6d %16.8f %14.8f %16.8f %12.4f\n", step, energy, ek, energy + ek, p);
    }
    printf("max |E_tot - E_tot(0)| per atom: %.3e eV\n", worst / N_ATOMS);
    mlipd_close(client);
    return 0;
}
