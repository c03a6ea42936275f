"""The T-MASS model: CLIP towers (clip.py), pooling (pooling.py), the text mass (stochastic.py),
counter-based noise (noise.py), the evaluation's scoring kernels (scoring.py), the module
(tmass.py: `TMASS`), and checkpoint import/export (io.py)."""
