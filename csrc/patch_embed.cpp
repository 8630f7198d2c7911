// Placeholder until the patch-embedding extension lands.
#include <torch/library.h>
TORCH_LIBRARY(vit_fast, m) {}
