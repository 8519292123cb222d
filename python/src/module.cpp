// patchcore._core: the library's classes for Python. A thin layer: arrays in and out, the GIL released around
// the library's calls, the library's exceptions as Python's. The modules patchcore.common, patchcore.sampler and
// patchcore.patchcore arrange these under the published code's names.
#include <ATen/ATen.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "patchcore/backbone/backbone.h"
#include "patchcore/backbone/network_feature_aggregator.h"
#include "patchcore/backbone/torchscript_backbone.h"
#include "patchcore/embedding/aggregator.h"
#include "patchcore/embedding/preprocessing.h"
#include "patchcore/memory_bank/sampler.h"
#include "patchcore/nn/exact_pruned_nn.h"
#include "patchcore/nn/faiss_nn.h"
#include "patchcore/nn/nearest_neighbour_scorer.h"
#include "patchcore/patchcore.h"
#include "patchcore/segmentation/rescale_segmentor.h"

namespace py = pybind11;
using namespace patchcore;

namespace {

// Whatever np.asarray accepts (a CPU torch tensor too), as C-contiguous float32.
using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;

// A tensor over the array's memory: valid while the caller holds the array, which it does for the whole call.
at::Tensor view_of(const FloatArray& array) {
  std::vector<int64_t> shape(array.shape(), array.shape() + array.ndim());
  return at::from_blob(const_cast<float*>(array.data()), shape, at::kFloat);
}

// For calls that keep the tensor beyond the call.
at::Tensor copy_of(const FloatArray& array) { return view_of(array).clone(); }

std::vector<at::Tensor> views_of(const std::vector<FloatArray>& arrays) {
  std::vector<at::Tensor> tensors;
  for (const auto& array : arrays) tensors.push_back(view_of(array));
  return tensors;
}

template <typename T>
py::array numpy_from(const at::Tensor& contiguous) {
  std::vector<py::ssize_t> shape(contiguous.sizes().begin(), contiguous.sizes().end());
  py::array_t<T> array(shape);
  std::memcpy(array.mutable_data(), contiguous.data_ptr<T>(), contiguous.numel() * sizeof(T));
  return array;
}

py::array to_numpy(const at::Tensor& tensor) {
  at::Tensor t = tensor.detach().to(at::kCPU).contiguous();
  switch (t.scalar_type()) {
    case at::kFloat:
      return numpy_from<float>(t);
    case at::kLong:
      return numpy_from<int64_t>(t);
    default:
      return numpy_from<float>(t.to(at::kFloat));
  }
}

py::list to_numpy_list(const std::vector<at::Tensor>& tensors) {
  py::list list;
  for (const auto& t : tensors) list.append(to_numpy(t));
  return list;
}

// "cpu", "cuda:0" or a torch.device, whose str() is one of those.
std::string device_name(const py::object& device) { return py::str(device).cast<std::string>(); }

// A side, or a (height, width) pair of equal sides, which is how the published PatchCore passes input_shape[-2:].
int64_t square_side(const py::object& size) {
  if (py::isinstance<py::int_>(size)) return size.cast<int64_t>();
  auto sides = size.cast<std::vector<int64_t>>();
  if (sides.size() != 2 || sides[0] != sides[1])
    throw std::invalid_argument(
        "RescaleSegmentor: target_size must be a side or a (height, width) pair of equal sides");
  return sides[0];
}

// The published code's attributes are None until fit or load, so a call out of order raises AttributeError there;
// the library's std::logic_error is that case. Bad arguments are ValueError, as Python's own checks raise.
void translate_exceptions(std::exception_ptr error) {
  try {
    if (error) std::rethrow_exception(error);
  } catch (const std::out_of_range& e) {
    PyErr_SetString(PyExc_IndexError, e.what());
  } catch (const std::invalid_argument& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
  } catch (const std::domain_error& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
  } catch (const std::length_error& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
  } catch (const std::logic_error& e) {
    PyErr_SetString(PyExc_AttributeError, e.what());
  }
}

// PatchCore.load_from_path replaces the model in place, while the library's returns a new one.
struct PyPatchCore {
  std::string device;
  std::unique_ptr<PatchCore> model;

  PatchCore& loaded() {
    if (!model) throw std::logic_error("PatchCore: load() or load_from_path() first");
    return *model;
  }
};

void bind_nearest_neighbours(py::module_& m) {
  py::class_<NearestNeighbourSearch, std::shared_ptr<NearestNeighbourSearch>>(m, "NearestNeighbourSearch")
      .def(
          "fit",
          [](NearestNeighbourSearch& self, const FloatArray& features) {
            at::Tensor bank = view_of(features);
            py::gil_scoped_release release;
            self.fit(bank);
          },
          py::arg("features"))
      .def(
          "run",
          [](const NearestNeighbourSearch& self, int64_t k, const FloatArray& query,
             const std::optional<FloatArray>& index) {
            at::Tensor queries = view_of(query);
            at::Tensor bank = index ? view_of(*index) : at::Tensor();
            std::pair<at::Tensor, at::Tensor> found;
            {
              py::gil_scoped_release release;
              found = self.run(k, queries, bank);
            }
            return py::make_tuple(to_numpy(found.first), to_numpy(found.second));
          },
          py::arg("n_nearest_neighbours"), py::arg("query_features"), py::arg("index_features") = py::none())
      .def("save", &NearestNeighbourSearch::save, py::arg("filename"), py::call_guard<py::gil_scoped_release>())
      .def("load", &NearestNeighbourSearch::load, py::arg("filename"), py::call_guard<py::gil_scoped_release>())
      .def("reset_index", &NearestNeighbourSearch::reset_index)
      .def_property_readonly("is_fitted", &NearestNeighbourSearch::is_fitted)
      .def("__len__", [](const NearestNeighbourSearch& self) { return self.size(); });

  py::class_<FaissNN, NearestNeighbourSearch, std::shared_ptr<FaissNN>>(m, "FaissNN")
      .def(py::init<bool, int>(), py::arg("on_gpu") = false, py::arg("num_workers") = 4)
      .def_property_readonly("on_gpu", &FaissNN::on_gpu)
      .def_property_readonly("num_workers", &FaissNN::num_workers);
  py::class_<ApproximateFaissNN, FaissNN, std::shared_ptr<ApproximateFaissNN>>(m, "ApproximateFaissNN")
      .def(py::init<bool, int>(), py::arg("on_gpu") = false, py::arg("num_workers") = 4);
  py::class_<ExactPrunedNN, NearestNeighbourSearch, std::shared_ptr<ExactPrunedNN>>(m, "ExactPrunedNN")
      .def(py::init<int, bool>(), py::arg("num_workers") = 4, py::arg("quantized_products") = true)
      .def_property_readonly("num_workers", &ExactPrunedNN::num_workers)
      .def_property_readonly("quantized_products", &ExactPrunedNN::quantized_products);

  py::class_<NearestNeighbourScorer>(m, "NearestNeighbourScorer")
      .def(py::init([](int64_t k, std::shared_ptr<NearestNeighbourSearch> nn_method) {
             if (!nn_method) nn_method = std::make_shared<FaissNN>(false, 4);
             return std::make_unique<NearestNeighbourScorer>(k, std::move(nn_method));
           }),
           py::arg("n_nearest_neighbours"), py::arg("nn_method").none(true) = py::none())
      .def(
          "fit",
          [](NearestNeighbourScorer& self, const std::vector<FloatArray>& detection_features) {
            std::vector<at::Tensor> features;
            for (const auto& f : detection_features) features.push_back(copy_of(f));
            py::gil_scoped_release release;
            self.fit(features);
          },
          py::arg("detection_features"))
      .def(
          "predict",
          [](const NearestNeighbourScorer& self, const std::vector<FloatArray>& query_features) {
            std::vector<at::Tensor> queries = views_of(query_features);
            std::tuple<at::Tensor, at::Tensor, at::Tensor> scored;
            {
              py::gil_scoped_release release;
              scored = self.predict(queries);
            }
            return py::make_tuple(to_numpy(std::get<0>(scored)), to_numpy(std::get<1>(scored)),
                                  to_numpy(std::get<2>(scored)));
          },
          py::arg("query_features"))
      .def("save", &NearestNeighbourScorer::save, py::arg("save_folder"), py::arg("save_features_separately") = false,
           py::arg("prepend") = "", py::call_guard<py::gil_scoped_release>())
      .def("load", &NearestNeighbourScorer::load, py::arg("load_folder"), py::arg("prepend") = "",
           py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("n_nearest_neighbours", &NearestNeighbourScorer::n_nearest_neighbours);
}

// A module's forward(Tensor) as a Python method: a numpy array in, the GIL released while it runs, numpy out.
template <typename Module>
auto numpy_forward() {
  return [](const Module& self, const FloatArray& features) {
    at::Tensor input = view_of(features), output;
    {
      py::gil_scoped_release release;
      output = self.forward(input);
    }
    return to_numpy(output);
  };
}

void bind_embedding(py::module_& m) {
  py::class_<MeanMapper>(m, "MeanMapper")
      .def(py::init<int64_t>(), py::arg("preprocessing_dim"))
      .def("forward", numpy_forward<MeanMapper>(), py::arg("features"))
      .def_property_readonly("preprocessing_dim", &MeanMapper::preprocessing_dim);

  py::class_<Preprocessing>(m, "Preprocessing")
      .def(py::init<std::vector<int64_t>, int64_t>(), py::arg("input_dims"), py::arg("output_dim"))
      .def(
          "forward",
          [](const Preprocessing& self, const std::vector<FloatArray>& features) {
            std::vector<at::Tensor> inputs = views_of(features);
            at::Tensor output;
            {
              py::gil_scoped_release release;
              output = self.forward(inputs);
            }
            return to_numpy(output);
          },
          py::arg("features"))
      .def_property_readonly("input_dims", &Preprocessing::input_dims)
      .def_property_readonly("output_dim", &Preprocessing::output_dim);

  py::class_<Aggregator>(m, "Aggregator")
      .def(py::init<int64_t>(), py::arg("target_dim"))
      .def("forward", numpy_forward<Aggregator>(), py::arg("features"))
      .def_property_readonly("target_dim", &Aggregator::target_dim);

  py::class_<RescaleSegmentor>(m, "RescaleSegmentor")
      .def(py::init([](const py::object& device, const py::object& target_size) {
             return std::make_unique<RescaleSegmentor>(device_name(device), square_side(target_size));
           }),
           py::arg("device"), py::arg("target_size") = 224)
      .def(
          "convert_to_segmentation",
          [](const RescaleSegmentor& self, const FloatArray& patch_scores) {
            at::Tensor scores = view_of(patch_scores);
            std::vector<at::Tensor> maps;
            {
              py::gil_scoped_release release;
              maps = self.convert_to_segmentation(scores);
            }
            return to_numpy_list(maps);
          },
          py::arg("patch_scores"))
      .def_property_readonly("target_size", &RescaleSegmentor::target_size)
      .def_property_readonly("smoothing", &RescaleSegmentor::smoothing);
}

void bind_backbone(py::module_& m) {
  py::class_<Backbone, std::shared_ptr<Backbone>>(m, "Backbone")
      .def_property_readonly("name", &Backbone::name)
      .def_property_readonly("architecture", &Backbone::architecture)
      .def_property_readonly("weights_path", &Backbone::weights_path)
      .def("layer_names", &Backbone::layer_names);
  m.def("load_backbone", &load_backbone, py::arg("architecture"), py::arg("weights_path"), py::arg("layers"),
        py::call_guard<py::gil_scoped_release>());
  m.def("resnet_names", &resnet_names);
  m.def(
      "torchscript_from_bytes",
      [](const py::bytes& serialized, const std::string& name) -> std::shared_ptr<Backbone> {
        std::string bytes = serialized;
        py::gil_scoped_release release;
        return std::make_shared<TorchScriptBackbone>(std::move(bytes), name);
      },
      py::arg("serialized"), py::arg("name"));

  py::class_<NetworkFeatureAggregator>(m, "NetworkFeatureAggregator")
      .def(py::init([](std::shared_ptr<Backbone> backbone, std::vector<std::string> layers, const py::object& device) {
             return std::make_unique<NetworkFeatureAggregator>(std::move(backbone), std::move(layers),
                                                               device_name(device));
           }),
           py::arg("backbone"), py::arg("layers_to_extract_from"), py::arg("device"))
      .def(
          "forward",
          [](const NetworkFeatureAggregator& self, const FloatArray& images) {
            at::Tensor input = view_of(images);
            torch::OrderedDict<std::string, at::Tensor> features;
            {
              py::gil_scoped_release release;
              features = self.forward(input);
            }
            py::dict outputs;
            for (const auto& item : features) outputs[py::str(item.key())] = to_numpy(item.value());
            return outputs;
          },
          py::arg("images"))
      .def("feature_dimensions", &NetworkFeatureAggregator::feature_dimensions, py::arg("input_shape"),
           py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("layers_to_extract_from", &NetworkFeatureAggregator::layers_to_extract_from)
      .def_property_readonly("backbone", &NetworkFeatureAggregator::backbone);
}

void bind_samplers(py::module_& m) {
  py::class_<BaseSampler, std::shared_ptr<BaseSampler>>(m, "BaseSampler")
      .def(
          "run",
          [](BaseSampler& self, const FloatArray& features) {
            at::Tensor input = view_of(features), selected;
            {
              py::gil_scoped_release release;
              selected = self.run(input);
            }
            return to_numpy(selected);
          },
          py::arg("features"))
      .def(
          "select",
          [](BaseSampler& self, const FloatArray& features) {
            at::Tensor input = view_of(features);
            py::gil_scoped_release release;
            return self.select(input);
          },
          py::arg("features"));
  py::class_<IdentitySampler, BaseSampler, std::shared_ptr<IdentitySampler>>(m, "IdentitySampler").def(py::init<>());
  py::class_<RandomSampler, BaseSampler, std::shared_ptr<RandomSampler>>(m, "RandomSampler")
      .def(py::init<double, uint64_t>(), py::arg("percentage"), py::arg("seed") = 0);
  py::class_<GreedyCoresetSampler, BaseSampler, std::shared_ptr<GreedyCoresetSampler>>(m, "GreedyCoresetSampler")
      .def(py::init([](double percentage, const py::object& device, int64_t dimension, uint64_t seed) {
             return std::make_shared<GreedyCoresetSampler>(percentage, c10::Device(device_name(device)), dimension,
                                                           seed);
           }),
           py::arg("percentage"), py::arg("device"), py::arg("dimension_to_project_features_to") = 128,
           py::arg("seed") = 0)
      .def(
          "set_projection",
          [](GreedyCoresetSampler& self, const FloatArray& weight) { self.set_projection(copy_of(weight)); },
          py::arg("weight"));
  py::class_<ApproximateGreedyCoresetSampler, GreedyCoresetSampler, std::shared_ptr<ApproximateGreedyCoresetSampler>>(
      m, "ApproximateGreedyCoresetSampler")
      .def(py::init([](double percentage, const py::object& device, int64_t starting_points, int64_t dimension,
                       uint64_t seed) {
             return std::make_shared<ApproximateGreedyCoresetSampler>(percentage, c10::Device(device_name(device)),
                                                                      starting_points, dimension, seed);
           }),
           py::arg("percentage"), py::arg("device"), py::arg("number_of_starting_points") = 10,
           py::arg("dimension_to_project_features_to") = 128, py::arg("seed") = 0)
      .def("set_starting_points", &ApproximateGreedyCoresetSampler::set_starting_points, py::arg("indices"));
}

void bind_patchcore(py::module_& m) {
  py::class_<PyPatchCore>(m, "PatchCore")
      .def(py::init([](const py::object& device) {
             auto self = std::make_unique<PyPatchCore>();
             self->device = device_name(device);
             return self;
           }),
           py::arg("device"))
      .def(
          "_load",
          [](PyPatchCore& self, std::shared_ptr<Backbone> backbone, std::vector<std::string> layers,
             const py::object& device, std::vector<int64_t> input_shape, int64_t pretrain_embed_dimension,
             int64_t target_embed_dimension, int64_t patchsize, int64_t patchstride, int64_t anomaly_score_num_nn,
             std::shared_ptr<BaseSampler> featuresampler, std::shared_ptr<NearestNeighbourSearch> nn_method, int resize,
             const std::string& batchnorm_statistics) {
            if (input_shape.size() != 3 || input_shape[0] != 3 || input_shape[1] != input_shape[2])
              throw std::invalid_argument("PatchCore.load: input_shape must be (3, size, size)");
            PatchCoreParams params;
            params.layers_to_extract_from = std::move(layers);
            params.pretrain_embed_dimension = pretrain_embed_dimension;
            params.target_embed_dimension = target_embed_dimension;
            params.patchsize = patchsize;
            params.patchstride = patchstride;
            params.anomaly_scorer_num_nn = anomaly_score_num_nn;
            params.transform.crop = static_cast<int>(input_shape[1]);
            params.transform.resize = resize;
            params.batchnorm_statistics = parse_batchnorm_statistics(batchnorm_statistics);
            if (!featuresampler) featuresampler = std::make_shared<IdentitySampler>();
            if (!nn_method) nn_method = std::make_shared<FaissNN>(false, 4);
            self.device = device_name(device);
            auto model = std::make_unique<PatchCore>(self.device);
            {
              py::gil_scoped_release release;
              model->load(std::move(backbone), params, std::move(featuresampler), std::move(nn_method));
            }
            self.model = std::move(model);
          },
          py::arg("backbone"), py::arg("layers_to_extract_from"), py::arg("device"), py::arg("input_shape"),
          py::arg("pretrain_embed_dimension"), py::arg("target_embed_dimension"), py::arg("patchsize"),
          py::arg("patchstride"), py::arg("anomaly_score_num_nn"), py::arg("featuresampler").none(true),
          py::arg("nn_method").none(true), py::arg("resize"), py::arg("batchnorm_statistics"))
      .def(
          "_embed",
          [](PyPatchCore& self, const FloatArray& images) {
            at::Tensor input = view_of(images), features;
            std::vector<int64_t> patch_shape;
            {
              py::gil_scoped_release release;
              features = self.loaded().embed(input, &patch_shape);
            }
            return py::make_tuple(to_numpy(features), patch_shape);
          },
          py::arg("images"))
      .def(
          "_fit_files",
          [](PyPatchCore& self, const std::vector<std::string>& paths, int64_t batch_size) {
            FitOptions options;
            options.batch_size = batch_size;
            py::gil_scoped_release release;
            self.loaded().fit(paths, options);
          },
          py::arg("paths"), py::arg("batch_size"))
      .def(
          "_fit_features",
          [](PyPatchCore& self, const FloatArray& features) {
            at::Tensor bank = view_of(features);
            py::gil_scoped_release release;
            self.loaded().fit_features(bank);
          },
          py::arg("features"))
      .def(
          "_predict",
          [](PyPatchCore& self, const FloatArray& images) {
            at::Tensor input = view_of(images);
            PredictResult result;
            {
              py::gil_scoped_release release;
              result = self.loaded().predict(input);
            }
            return py::make_tuple(py::cast(result.scores), to_numpy_list(result.masks));
          },
          py::arg("images"))
      .def(
          "_load_images",
          [](PyPatchCore& self, const std::vector<std::string>& paths) {
            std::vector<at::Tensor> images;
            {
              py::gil_scoped_release release;
              for (const auto& path : paths) images.push_back(self.loaded().params().transform.load(path));
            }
            return to_numpy(at::stack(images));
          },
          py::arg("paths"))
      .def(
          "save_to_path",
          [](PyPatchCore& self, const std::string& save_path, const std::string& prepend) {
            py::gil_scoped_release release;
            self.loaded().save_to_path(save_path, prepend);
          },
          py::arg("save_path"), py::arg("prepend") = "")
      .def(
          "_load_from_path",
          [](PyPatchCore& self, const std::string& load_path, const py::object& device, int num_workers,
             const std::string& prepend) {
            std::string name = device_name(device);
            std::unique_ptr<PatchCore> model;
            {
              py::gil_scoped_release release;
              model = PatchCore::load_from_path(load_path, name, num_workers, prepend);
            }
            self.device = name;
            self.model = std::move(model);
          },
          py::arg("load_path"), py::arg("device"), py::arg("num_workers"), py::arg("prepend"))
      .def_property_readonly("device", [](const PyPatchCore& self) { return self.device; })
      .def_property_readonly("layers_to_extract_from",
                             [](PyPatchCore& self) { return self.loaded().params().layers_to_extract_from; })
      .def_property_readonly("input_shape", [](PyPatchCore& self) { return self.loaded().params().input_shape(); })
      .def_property_readonly("memory_bank", [](PyPatchCore& self) { return to_numpy(self.loaded().memory_bank()); })
      .def_property_readonly("memory_bank_size", [](PyPatchCore& self) { return self.loaded().memory_bank_size(); });
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "The patchcore C++ library; use patchcore.common, patchcore.sampler and patchcore.patchcore.";
  m.attr("__version__") = version();
  py::register_exception_translator(&translate_exceptions);
  bind_nearest_neighbours(m);
  bind_embedding(m);
  bind_backbone(m);
  bind_samplers(m);
  bind_patchcore(m);
}
