// Titanax: the one header users include.  namespace tx = titanax;
#pragma once

#include "autodiff/autodiff.h"
#include "core/allocator.h"
#include "core/device.h"
#include "core/dtype.h"
#include "core/error.h"
#include "core/op.h"
#include "core/rng.h"
#include "core/shape.h"
#include "core/tensor.h"
#include "core/tree.h"
#include "ops/ops.h"
