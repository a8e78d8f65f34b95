"""Models: classifiers, generative models (encode/decode interface), training, cache."""
from .cache import ModelCache, cache_key, default_cache_dir
from .classifiers import CLASSIFIERS, MLP, ClassifierConfig, LeNet, SmallResNet, SmallVGG, build_classifier
from .generative import VAE, ConvAutoencoder, GenerativeConfig, GenerativeModel, build_generative
from .flows import ImageFlow, VectorFlow
from .gan import DCGAN
from .generator_zoo import get_gan, get_generator, get_helix_flow, get_image_flow, get_vector_flow
from .generators import (
    ApproximateGeneratorWarning,
    Generator,
    Inversion,
    as_generator,
    flatten_latent,
    invert_generator,
    unflatten_latent,
)
from .training import (
    AdversarialConfig,
    GenerativeTrainConfig,
    GeneratorTrainConfig,
    TrainConfig,
    accuracy,
    fit_classifier,
    fit_generative,
    fit_generator,
    pgd_l2,
    predict,
)
from .resolve import ModelInfo
from .known_manifold import KnownData, KnownManifold, known_data, make_known_manifold
from .zoo import get_classifier, get_generative, state_fingerprint

__all__ = [
    "KnownData", "KnownManifold", "known_data", "make_known_manifold",
    "ModelCache", "cache_key", "default_cache_dir",
    "CLASSIFIERS", "MLP", "ClassifierConfig", "LeNet", "SmallResNet", "SmallVGG", "build_classifier",
    "VAE", "ConvAutoencoder", "GenerativeConfig", "GenerativeModel", "build_generative",
    "Generator", "as_generator", "invert_generator", "Inversion", "ApproximateGeneratorWarning",
    "flatten_latent", "unflatten_latent", "ImageFlow", "VectorFlow", "DCGAN",
    "GeneratorTrainConfig", "fit_generator", "get_image_flow", "get_vector_flow", "get_helix_flow", "get_gan", "get_generator",
    "AdversarialConfig", "GenerativeTrainConfig", "TrainConfig", "accuracy", "fit_classifier", "fit_generative",
    "pgd_l2", "predict", "get_classifier", "get_generative", "state_fingerprint", "ModelInfo",
]
