import os

# jaxlib's CPU QR/SVD call OpenBLAS, whose threads fight XLA's on small machines (dlrt.md, sec. 5).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
