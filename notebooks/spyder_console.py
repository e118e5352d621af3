# %% [markdown]
# # A year of hourly analysis in a Spyder console
# Run cell by cell (Ctrl+Enter). The Variable Explorer stays safe to refresh
# at any point: no array over closed shared memory ever reaches it.

# %%
%load_ext shm_kernel_safe

# %%
import time

import numpy as np

ROWS = 1_000_000  # 10_000_000 in the original question
HOURS = 8760
x = np.random.default_rng(2026).standard_normal((ROWS, 16))


def hourly_calc(x, nn, rows_per_hour=ROWS // 80):
    start = (nn * (x.shape[0] - rows_per_hour)) // (HOURS - 1)
    block = x[start:start + rows_per_hour]
    return float(np.sqrt(np.abs(block)).sum())


# %%
%shm_share x

# %%
y = np.zeros(HOURS)
t0 = time.perf_counter()

# %%
%%shm_parallel nn in range(HOURS) --out y
y[nn] = hourly_calc(x, nn)

# %%
print(f"parallel: {time.perf_counter() - t0:.2f} s")
print("agrees with a serial loop:",
      np.allclose(y[:100], [hourly_calc(x, nn) for nn in range(100)]))

# %%
%shm_status
