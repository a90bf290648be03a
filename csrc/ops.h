// Declarations of every op in stablelm_fast._C. Schemas live in torch_bindings.cpp (one per op).
#pragma once
#include <torch/all.h>
