"""The measurements, one module each: P0, M1 (with and without the workers), M2, M3, M4, M5, wrk."""
