"""The sizes the ops support, in one place on the Python side; csrc/common/limits.h is the kernels' copy and
a CPU test (tests/test_op_registration.py) checks that the two agree."""

FEAT_DIM = 16  # d: Based query/key dimension
VALUE_DIM = 64  # e: Based value dimension
COMPACT_FEATURES = 1 + FEAT_DIM + FEAT_DIM * (FEAT_DIM + 1) // 2  # 153: the state's feature count
EXPANDED_FEATURES = 1 + FEAT_DIM + FEAT_DIM * FEAT_DIM  # 273: the Based model's own layout

SWD_HEAD_DIMS = (64, 128)  # sliding_window_decode: head size e
SWD_MAX_WINDOW = 256  # sliding_window_decode: 1 <= window <= this
