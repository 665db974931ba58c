// Op-table entries for the neural-network ops (softmax, cross-entropy, layer-norm, dropout, embedding,
// conv2d, max-pool). See op_cases.h.
#include <cmath>

#include "op_cases.h"

namespace titanax::testing {
namespace {

RngKey k(RngKey key, int i) { return fold_in(key, uint64_t(i)); }

// f64 values of `shape` that are pairwise at least ~0.08 apart (a shuffled ladder of multiples of 0.1
// plus noise below 0.01): max-pool windows never hold near-ties, so finite differences cannot flip a max.
Tensor distinct64(RngKey key, const Shape& shape) {
  std::vector<double> u = random_uniform(key, shape, DType::f64).to_vector<double>();
  const int64_t n = int64_t(u.size());
  std::vector<double> v(u.size());
  for (int64_t i = 0; i < n; ++i) v[size_t(i)] = 0.1 * double((i * 7919) % n) - 0.05 * double(n) + 0.01 * u[size_t(i)];
  return from_vector(v, shape);
}

// Labels in [0, classes) with the positions in `ignored` set to ignore_index.
Tensor labels_with(RngKey key, const Shape& shape, int64_t classes, std::vector<size_t> ignored = {},
                   int64_t ignore_index = -100) {
  std::vector<int64_t> v = randint(key, shape, classes).to_vector<int64_t>();
  for (size_t i : ignored) v[i] = ignore_index;
  return from_vector(v, shape);
}

}  // namespace

std::vector<OpCase> extra_op_cases() {
  std::vector<OpCase> cs;

  // ---- softmax / log_softmax: last axis (row path), axis 0 and a middle axis (column path), strided input.
  for (bool log : {false, true}) {
    std::string nm = log ? "log_softmax" : "softmax";
    auto f = log ? log_softmax : softmax;
    cs.push_back({nm + "/axis-1", [](RngKey key) { return TensorList{randn64(k(key, 0), Shape{3, 5}, 2.0)}; },
                  [f](const TensorList& in) { return f(in[0], -1); }});
    cs.push_back({nm + "/axis0", [](RngKey key) { return TensorList{randn64(k(key, 0), Shape{4, 3}, 2.0)}; },
                  [f](const TensorList& in) { return f(in[0], 0); }});
    cs.push_back({nm + "/axis1_of_3", [](RngKey key) { return TensorList{randn64(k(key, 0), Shape{2, 3, 4})}; },
                  [f](const TensorList& in) { return f(in[0], 1); }});
    cs.push_back({nm + "/transposed_view", [](RngKey key) { return TensorList{randn64(k(key, 0), Shape{4, 3})}; },
                  [f](const TensorList& in) { return f(in[0].T(), -1); }});
  }

  // ---- cross_entropy: mean / sum / none, ignored labels, i32 labels, [..., C] logits.
  cs.push_back({"cross_entropy/mean", [](RngKey key) {
                  return TensorList{randn64(k(key, 0), Shape{4, 5}, 2.0), labels_with(k(key, 1), Shape{4}, 5)};
                },
                [](const TensorList& in) { return cross_entropy(in[0], in[1]); }});
  cs.push_back({"cross_entropy/sum", [](RngKey key) {
                  return TensorList{randn64(k(key, 0), Shape{4, 5}, 2.0), labels_with(k(key, 1), Shape{4}, 5)};
                },
                [](const TensorList& in) { return cross_entropy(in[0], in[1], Reduction::sum); }});
  cs.push_back({"cross_entropy/none_rank3", [](RngKey key) {
                  return TensorList{randn64(k(key, 0), Shape{2, 3, 4}), labels_with(k(key, 1), Shape{2, 3}, 4)};
                },
                [](const TensorList& in) { return cross_entropy(in[0], in[1], Reduction::none); }});
  cs.push_back({"cross_entropy/mean_ignored", [](RngKey key) {
                  return TensorList{randn64(k(key, 0), Shape{5, 4}, 2.0), labels_with(k(key, 1), Shape{5}, 4, {1, 3})};
                },
                [](const TensorList& in) { return cross_entropy(in[0], in[1]); }});
  cs.push_back({"cross_entropy/none_ignored_custom_index", [](RngKey key) {
                  return TensorList{randn64(k(key, 0), Shape{4, 3}), labels_with(k(key, 1), Shape{4}, 3, {2}, 7)};
                },
                [](const TensorList& in) { return cross_entropy(in[0], in[1], Reduction::none, 7); }});
  cs.push_back({"cross_entropy/i32_labels", [](RngKey key) {
                  return TensorList{randn64(k(key, 0), Shape{3, 6}), labels_with(k(key, 1), Shape{3}, 6).astype(DType::i32)};
                },
                [](const TensorList& in) { return cross_entropy(in[0], in[1], Reduction::sum); }});

  // ---- layer_norm: with w and b, without, w only, b only.
  cs.push_back({"layer_norm/affine", [](RngKey key) {
                  return TensorList{randn64(k(key, 0), Shape{3, 6}, 2.0), randn64(k(key, 1), Shape{6}), randn64(k(key, 2), Shape{6})};
                },
                [](const TensorList& in) { return layer_norm(in[0], in[1], in[2]); }});
  cs.push_back({"layer_norm/plain_rank3", [](RngKey key) { return TensorList{randn64(k(key, 0), Shape{2, 3, 5})}; },
                [](const TensorList& in) { return layer_norm(in[0], {}, {}); }});
  cs.push_back({"layer_norm/w_only", [](RngKey key) {
                  return TensorList{randn64(k(key, 0), Shape{4, 3}), randn64(k(key, 1), Shape{3})};
                },
                [](const TensorList& in) { return layer_norm(in[0], in[1], {}, 1e-3); }});
  cs.push_back({"layer_norm/b_only", [](RngKey key) {
                  return TensorList{randn64(k(key, 0), Shape{4, 3}), randn64(k(key, 1), Shape{3})};
                },
                [](const TensorList& in) { return layer_norm(in[0], {}, in[1]); }});

  // ---- scaled_dot_product_attention: causal and full, Tq != Tk, one and several 64-row tiles (kernels/cpu/
  // attention.h), head dimensions below and above a warp's 32 lanes (the CUDA kernels), a strided q.
  auto attention_case = [&cs](std::string name, Shape qs, Shape ks, bool causal, bool transposed_q = false) {
    cs.push_back({"scaled_dot_product_attention/" + name, [qs, ks](RngKey key) {
                    return TensorList{randn64(k(key, 0), qs), randn64(k(key, 1), ks), randn64(k(key, 2), ks)};
                  },
                  [causal, transposed_q](const TensorList& in) {
                    Tensor q = transposed_q ? in[0].transpose(0, 1).contiguous().transpose(0, 1) : in[0];
                    return scaled_dot_product_attention(q, in[1], in[2], causal);
                  }});
  };
  attention_case("causal", Shape{2, 2, 9, 4}, Shape{2, 2, 9, 4}, true);
  attention_case("full_tq_ne_tk", Shape{3, 5, 6}, Shape{3, 7, 6}, false);
  attention_case("causal_tq_gt_tk", Shape{2, 7, 3}, Shape{2, 4, 3}, true);
  attention_case("causal_tiles", Shape{1, 70, 5}, Shape{1, 70, 5}, true);
  attention_case("full_tiles_d33", Shape{1, 65, 33}, Shape{1, 66, 33}, false);
  attention_case("strided_q", Shape{4, 2, 8, 3}, Shape{4, 2, 8, 3}, true, true);
  // The packed layout ([..., T, 3, H, D] -> [..., T, H, D]): leading axes none, one, two.
  auto packed_case = [&cs](std::string name, Shape qkv, bool causal) {
    cs.push_back({"scaled_dot_product_attention_qkvpacked/" + name, [qkv](RngKey key) { return TensorList{randn64(k(key, 0), qkv)}; },
                  [causal](const TensorList& in) { return scaled_dot_product_attention_qkvpacked(in[0], causal); }});
  };
  packed_case("causal", Shape{2, 9, 3, 2, 4}, true);
  packed_case("full_no_batch", Shape{7, 3, 3, 5}, false);
  packed_case("causal_tiles_two_lead_axes", Shape{1, 2, 70, 3, 1, 6}, true);

  // ---- dropout (training, fixed key): linear in x, the mask fixed by the key.
  cs.push_back({"dropout/training", [](RngKey key) { return TensorList{randn64(k(key, 0), Shape{4, 8})}; },
                [](const TensorList& in) { return dropout(in[0], 0.3, RngKey::from_seed(42), true); }});
  cs.push_back({"dropout/transposed_view", [](RngKey key) { return TensorList{randn64(k(key, 0), Shape{5, 3})}; },
                [](const TensorList& in) { return dropout(in[0].T(), 0.5, RngKey::from_seed(43), true); }});

  // ---- embedding / take with repeated indices (the backward must sum the repeats).
  cs.push_back({"embedding/repeated_ids", [](RngKey key) {
                  return TensorList{randn64(k(key, 0), Shape{6, 3}),
                                    from_vector(std::vector<int64_t>{1, 3, 1, 0, 5, 3, 3, 2}, Shape{2, 4})};
                },
                [](const TensorList& in) { return embedding(in[0], in[1]); }});
  cs.push_back({"embedding/i32_ids", [](RngKey key) {
                  return TensorList{randn64(k(key, 0), Shape{4, 5}), from_vector(std::vector<int32_t>{2, 2, 0}, Shape{3})};
                },
                [](const TensorList& in) { return embedding(in[0], in[1]); }});
  cs.push_back({"take/axis1", [](RngKey key) {
                  return TensorList{randn64(k(key, 0), Shape{3, 4, 2}),
                                    from_vector(std::vector<int64_t>{3, 0, 3, 1, 1, 2}, Shape{2, 3})};
                },
                [](const TensorList& in) { return take(in[0], in[1], 1); }});
  cs.push_back({"take/axis-1", [](RngKey key) {
                  return TensorList{randn64(k(key, 0), Shape{2, 5}), from_vector(std::vector<int64_t>{4, 4, 0, 2}, Shape{4})};
                },
                [](const TensorList& in) { return take(in[0], in[1], -1); }});
  cs.push_back({"take/axis0_scalar_index", [](RngKey key) {
                  return TensorList{randn64(k(key, 0), Shape{3, 4}), from_vector(std::vector<int64_t>{2}, Shape{})};
                },
                [](const TensorList& in) { return take(in[0], in[1], 0); }});

  // ---- conv2d: stride 2 + padding 1 with bias, no bias, rectangular kernel and stride, multiple channels.
  cs.push_back({"conv2d/stride2_pad1_bias", [](RngKey key) {
                  return TensorList{randn64(k(key, 0), Shape{2, 3, 7, 6}), randn64(k(key, 1), Shape{4, 3, 3, 3}, 0.5),
                                    randn64(k(key, 2), Shape{4})};
                },
                [](const TensorList& in) { return conv2d(in[0], in[1], in[2], {2, 2}, {1, 1}); }});
  cs.push_back({"conv2d/no_bias", [](RngKey key) {
                  return TensorList{randn64(k(key, 0), Shape{2, 2, 5, 5}), randn64(k(key, 1), Shape{3, 2, 3, 3}, 0.5)};
                },
                [](const TensorList& in) { return conv2d(in[0], in[1]); }});
  cs.push_back({"conv2d/rect_kernel_stride", [](RngKey key) {
                  return TensorList{randn64(k(key, 0), Shape{1, 3, 6, 7}), randn64(k(key, 1), Shape{2, 3, 2, 3}, 0.5),
                                    randn64(k(key, 2), Shape{2})};
                },
                [](const TensorList& in) { return conv2d(in[0], in[1], in[2], {1, 2}, {1, 0}); }});

  // ---- max_pool2d: 2x2 (stride = kernel) and 3x3 stride 2 padding 1, on inputs without near-ties.
  cs.push_back({"max_pool2d/2x2", [](RngKey key) { return TensorList{distinct64(k(key, 0), Shape{2, 3, 6, 6})}; },
                [](const TensorList& in) { return max_pool2d(in[0], {2, 2}); }});
  cs.push_back({"max_pool2d/3x3_stride2_pad1", [](RngKey key) { return TensorList{distinct64(k(key, 0), Shape{2, 2, 7, 7})}; },
                [](const TensorList& in) { return max_pool2d(in[0], {3, 3}, {2, 2}, {1, 1}); }});
  cs.push_back({"max_pool2d/odd_input_2x2", [](RngKey key) { return TensorList{distinct64(k(key, 0), Shape{1, 2, 5, 7})}; },
                [](const TensorList& in) { return max_pool2d(in[0], {2, 2}); }});

  // max_pool2d_indices: on distinct values, and on values in {0, 1, 2} where most windows tie (the first
  // maximum wins on every device). The second derivative: the gradient of a squared pooling, whose own
  // gradient reads the cotangent at the winners (max_pool2d_backward's vjp).
  cs.push_back({"max_pool2d_indices/3x3_stride2_pad1", [](RngKey key) { return TensorList{distinct64(k(key, 0), Shape{2, 2, 7, 7})}; },
                [](const TensorList& in) { return max_pool2d_indices(in[0], {3, 3}, {2, 2}, {1, 1}); }, false});
  cs.push_back({"max_pool2d_indices/ties", [](RngKey key) { return TensorList{randint(k(key, 0), Shape{2, 3, 7, 6}, 3).astype(DType::f64)}; },
                [](const TensorList& in) { return max_pool2d_indices(in[0], {3, 2}, {1, 2}, {1, 1}); }, false});
  cs.push_back({"max_pool2d/second_order", [](RngKey key) { return TensorList{distinct64(k(key, 0), Shape{2, 2, 7, 7})}; },
                [](const TensorList& in) {
                  GradModeGuard on(true);  // gradcheck's numeric pass runs without recording
                  const bool outer = in[0].requires_grad();
                  const Tensor x = outer ? in[0] : in[0].detach().set_requires_grad();
                  BackwardOptions o;
                  o.create_graph = outer;
                  return grad(sum(square(max_pool2d(x, {3, 3}, {2, 2}, {1, 1}))), {x}, o)[0];
                }});

  // ---- a small CNN block end to end: conv -> relu -> pool -> linear -> cross_entropy.
  cs.push_back({"cnn_block", [](RngKey key) {
                  return TensorList{distinct64(k(key, 0), Shape{2, 1, 6, 6}), randn64(k(key, 1), Shape{2, 1, 3, 3}, 0.5),
                                    randn64(k(key, 2), Shape{2}, 0.1), randn64(k(key, 3), Shape{3, 8}, 0.5),
                                    from_vector(std::vector<int64_t>{2, 0}, Shape{2})};
                },
                [](const TensorList& in) {
                  Tensor h = max_pool2d(relu(conv2d(in[0], in[1], in[2], {1, 1}, {0, 0})), {2, 2});
                  return cross_entropy(linear(h.flatten(1), in[3]), in[4]);
                },
                false});  // relu kinks and pool ties on derived values: covered op by op above
  return cs;
}

}  // namespace titanax::testing
