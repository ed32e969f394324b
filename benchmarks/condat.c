/* Condat's simplex projection (L. Condat, "Fast projection onto the simplex and the
 * l1 ball", Math. Programming 158, 2016), written for sumto's benchmarks from the
 * paper's description: a serial O(n)-expected reference that long rows are measured
 * against. Not part of the library.
 *
 * project_rows_<type>(x, y, rows, n, total, work): y[r] = max(x[r] - tau_r, 0), with
 * tau_r such that each row of y sums to total (> 0). work holds 2 * n entries.
 */
#include <stddef.h>

#define DEFINE_CONDAT(T, NAME)                                                         \
    static T NAME##_threshold(const T *x, size_t n, T total, T *v, T *spill) {         \
        size_t nv = 1, ns = 0;                                                          \
        v[0] = x[0];                                                                    \
        T rho = x[0] - total;                                                           \
        /* one pass: v holds a candidate support, spill the entries it dropped */       \
        for (size_t i = 1; i < n; i++) {                                                \
            T xi = x[i];                                                                \
            if (xi > rho) {                                                             \
                rho += (xi - rho) / (T)(nv + 1);                                        \
                if (rho > xi - total) {                                                 \
                    v[nv++] = xi;                                                       \
                } else {                                                                \
                    for (size_t k = 0; k < nv; k++) spill[ns++] = v[k];                 \
                    v[0] = xi;                                                          \
                    nv = 1;                                                             \
                    rho = xi - total;                                                   \
                }                                                                       \
            }                                                                           \
        }                                                                               \
        /* spilled entries above the threshold rejoin the candidate support */         \
        for (size_t k = 0; k < ns; k++) {                                               \
            T s = spill[k];                                                             \
            if (s > rho) {                                                              \
                v[nv++] = s;                                                            \
                rho += (s - rho) / (T)nv;                                               \
            }                                                                           \
        }                                                                               \
        /* remove entries at or below the threshold until none is */                   \
        int changed = 1;                                                                \
        while (changed) {                                                               \
            changed = 0;                                                                \
            size_t kept = 0;                                                            \
            for (size_t k = 0; k < nv; k++) {                                           \
                T s = v[k];                                                             \
                if (s > rho) {                                                          \
                    v[kept++] = s;                                                      \
                } else if (kept + (nv - k - 1) > 0) {                                   \
                    /* one entry fewer: the mean shifts by (rho - s) / remaining */     \
                    size_t remaining = kept + (nv - k - 1);                             \
                    rho += (rho - s) / (T)remaining;                                    \
                    changed = 1;                                                        \
                }                                                                       \
            }                                                                           \
            nv = kept;                                                                  \
        }                                                                               \
        return rho;                                                                     \
    }                                                                                   \
                                                                                        \
    void NAME##_rows(const T *x, T *y, size_t rows, size_t n, T total, T *work) {       \
        for (size_t r = 0; r < rows; r++) {                                             \
            const T *xr = x + r * n;                                                    \
            T *yr = y + r * n;                                                          \
            T tau = NAME##_threshold(xr, n, total, work, work + n);                     \
            for (size_t i = 0; i < n; i++) {                                            \
                T d = xr[i] - tau;                                                      \
                yr[i] = d > 0 ? d : (T)0;                                               \
            }                                                                           \
        }                                                                               \
    }

DEFINE_CONDAT(float, condat_float)
DEFINE_CONDAT(double, condat_double)
