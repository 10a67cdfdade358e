"""Pipeline definitions: one YAML file sets every stage's config in one place.

A pipeline file (see ``workflows/*.yaml``) has these top-level keys, each the
config of one stage; any key left out takes its documented defaults::

    name: alard-lupton
    method: alard-lupton          # alard-lupton | alard-lupton-score | zogy
    template: {...}               # GetTemplateConfig
    alard_lupton: {...}           # AlardLuptonConfig (both Alard-Lupton methods)
    zogy: {...}                   # ZogyConfig
    detection: {...}              # DetectAndMeasureConfig
    injection: {...}              # InjectionConfig (off by default)
    execution: {...}              # ExecutionConfig

Each setting exists in exactly one of these blocks, so no value can be given
twice (the anchor's old monolithic config suffered from exactly that). Loading
validates every key and names the bad one.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from ..config import ConfigBase, config_field
from ..cosmic_rays import CosmicRayConfig
from ..detect import DetectAndMeasureConfig
from ..qa import InjectionConfig
from ..errors import ConfigurationError
from ..subtract import AlardLuptonConfig
from ..template import GetTemplateConfig

__all__ = ["ExecutionConfig", "PipelineConfig", "load_pipeline", "METHODS", "builtin_pipeline_path",
           "dump_pipeline_yaml", "recommended_pipeline"]

#: Subtraction methods a pipeline can run.
METHODS = ("alard-lupton", "alard-lupton-score", "zogy")

#: Folder of the pipeline files shipped with the repository.
_WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"


@dataclasses.dataclass(frozen=True)
class ExecutionConfig(ConfigBase):
    """How the survey run executes (not what it computes)."""

    retries: int = config_field(
        2, "Times Dask retries a task after a transient error (I/O, lost worker); other errors are "
           "recorded, never retried.", minimum=0, maximum=20)
    chunk_size: int = config_field(
        1024, "Chunk side (pixels) of the images written to the output Zarr stores.", minimum=64)
    write_difference: bool = config_field(
        True, "Write the difference image of every (visit, detector) to difference.zarr.")
    write_score: bool = config_field(
        True, "Write the score image (score methods) to score.zarr.")


def _optional_configs() -> dict[str, type[ConfigBase]]:
    """Stage configs whose modules may be absent in this version (ZOGY)."""
    found: dict[str, type[ConfigBase]] = {}
    try:
        from ..zogy import ZogyConfig

        found["zogy"] = ZogyConfig
    except ImportError:
        pass
    return found


@dataclasses.dataclass(frozen=True)
class PipelineConfig(ConfigBase):
    """A whole pipeline: the method and the config of every stage.

    ``zogy`` holds a plain mapping validated against the ZOGY config on load
    (see :meth:`stage_config`), so this class does not import a stage that is
    optional.
    """

    name: str = config_field("alard-lupton", "Pipeline name (recorded in the provenance).")
    method: str = config_field("alard-lupton", "Subtraction method.", choices=METHODS)
    cosmic_rays: CosmicRayConfig = config_field(
        doc="Cosmic-ray finding and repair on each science exposure before subtraction (and "
        "before any injection); the CR and INTRP planes reach the difference's mask.",
        default_factory=CosmicRayConfig)
    template: GetTemplateConfig = config_field(doc="Template assembly config.",
                                               default_factory=GetTemplateConfig)
    alard_lupton: AlardLuptonConfig = config_field(
        doc="Alard-Lupton config, used by both Alard-Lupton methods.", default_factory=AlardLuptonConfig)
    zogy: dict = config_field(doc="ZOGY config (ZogyConfig fields).", default_factory=dict)
    detection: DetectAndMeasureConfig = config_field(
        doc="Detection and measurement config.", default_factory=DetectAndMeasureConfig)
    injection: InjectionConfig = config_field(
        doc="Source injection into every science image before subtraction (n_sources=0: off).",
        default_factory=InjectionConfig)
    execution: ExecutionConfig = config_field(doc="Execution settings.", default_factory=ExecutionConfig)

    def validate(self) -> None:
        optional = _optional_configs()
        for key in ("zogy",):
            block = getattr(self, key)
            if key in optional:
                # Store the block fully expanded, so equal pipelines compare equal.
                expanded = optional[key].from_dict(block, _prefix=f"{key}.").to_dict()
                object.__setattr__(self, key, expanded)
            elif block:
                raise ConfigurationError(f"{key}: this version of diffim_dask has no {key} stage")
        if self.method == "zogy" and "zogy" not in optional:
            raise ConfigurationError("method 'zogy' is not available in this version of diffim_dask")

    def stage_config(self, key: str) -> ConfigBase:
        """The validated config object of a stage (``"template"``, ``"zogy"``, ...)."""
        value = getattr(self, key)
        if isinstance(value, ConfigBase):
            return value
        optional = _optional_configs()
        if key not in optional:
            raise ConfigurationError(f"stage {key!r} is not available in this version of diffim_dask")
        return optional[key].from_dict(value, _prefix=f"{key}.")

    @property
    def is_score_method(self) -> bool:
        """Whether the method produces a score image for detection."""
        return self.method in ("alard-lupton-score", "zogy")


def load_pipeline(source: str | Path | dict[str, Any]) -> PipelineConfig:
    """Load and validate a pipeline file (or mapping).

    Parameters
    ----------
    source : path, str or dict
        A YAML file, the name of a built-in pipeline (``alard-lupton``,
        ``alard-lupton-score``, ``zogy``) or an already-parsed mapping.

    Raises
    ------
    ConfigurationError
        On a missing file, invalid YAML, an unknown key (named with its full
        path, e.g. ``detection.detection.threshhold``) or an invalid value.
    """
    if isinstance(source, dict):
        data, where = source, "pipeline"
    else:
        path = Path(source)
        if not path.exists() and str(source) in METHODS:
            path = builtin_pipeline_path(str(source))
        if not path.is_file():
            raise ConfigurationError(f"pipeline file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigurationError(f"{path}: invalid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigurationError(f"{path}: a pipeline file must be a mapping of stage configs")
        where = str(path)
    try:
        return PipelineConfig.from_dict(data)
    except ConfigurationError as exc:
        raise ConfigurationError(f"{where}: {exc}") from None


def builtin_pipeline_path(name: str) -> Path:
    """Path of a pipeline file shipped in ``workflows/``."""
    if name not in METHODS:
        raise ConfigurationError(f"unknown built-in pipeline {name!r}; choose one of {list(METHODS)}")
    return _WORKFLOWS / f"{name}.yaml"


def _yaml_scalar(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text[:-4].strip() if text.endswith("\n...") else text.removesuffix("...").strip()


def _dump_block(config: ConfigBase, indent: int, lines: list[str]) -> None:
    pad = "  " * indent
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        doc = " ".join(field.metadata.get("doc", "").split())
        choices = field.metadata.get("choices")
        if choices:
            doc += f" Choices: {', '.join(map(str, choices))}."
        lines.append(f"{pad}# {doc}")
        if isinstance(value, ConfigBase):
            lines.append(f"{pad}{field.name}:")
            _dump_block(value, indent + 1, lines)
        else:
            if isinstance(value, tuple):
                value = list(value)
            lines.append(f"{pad}{field.name}: {_yaml_scalar(value)}")


def dump_pipeline_yaml(pipeline: PipelineConfig) -> str:
    """The pipeline as YAML with every setting written out and documented.

    The optional stage (``zogy``) is expanded to their full
    configs when available, so the file shows every value in one place.
    """
    lines = [f"# diffim_dask pipeline '{pipeline.name}' (generated by `diffim-dask pipeline`; edit freely).",
             "# Every setting appears exactly once; keys left out take their documented defaults."]
    expanded = {}
    for key in ("zogy",):
        try:
            expanded[key] = pipeline.stage_config(key)
        except ConfigurationError:
            expanded[key] = None
    for field in dataclasses.fields(pipeline):
        value = getattr(pipeline, field.name)
        lines.append("")
        lines.append(f"# {' '.join(field.metadata.get('doc', '').split())}")
        block = expanded.get(field.name) if field.name in expanded else value
        if isinstance(block, ConfigBase):
            lines.append(f"{field.name}:")
            _dump_block(block, 1, lines)
        elif field.name in expanded:
            lines.append(f"{field.name}: {{}}")
        else:
            lines.append(f"{field.name}: {_yaml_scalar(value)}")
    return "\n".join(lines) + "\n"


def recommended_pipeline(method: str = "alard-lupton") -> PipelineConfig:
    """The pipeline shipped as ``workflows/<method>.yaml``: library defaults plus tuning.

    One deliberate change from the stage defaults: the Alard-Lupton kernel
    varies as a 2nd-order polynomial of position (library and anchor default:
    1). Survey PSFs vary quadratically across a detector (focus, field
    curvature); on the simulated 2048² pair with ±15 % PSF variation, order 1
    leaves 27 false 5σ detections and order 2 leaves 1 (tests/test_al_quality.py).
    An all-pixels fit on a frame with few stars lowers it until each spatial
    term has ``auto_stars_per_term`` stars (on a 256² DECam frame with ~10
    stars: order 0).

    The direction stays ``convolveTemplate`` even for a template broader than
    the science image. ``auto`` (convolve the science image then) was measured
    worse on simulated pairs with a deep template (template 2.9 px, science
    2.5 px, noise 0.25 of the science's; 1024², 150 transients of S/N 5-8 each,
    seeds 1-6 without and 1-8 with ±15 % PSF variation): convolveScience found
    599 and 821 of them with 202 and 186 false detections, convolveTemplate 658
    and 881 with 55 and 92. Convolving the noisy science image leaves the
    difference's high frequencies to the faint template noise, and the
    decorrelation filter then amplifies them (and any kernel mismatch) up to
    four-fold. For such pairs the score variant (method ``alard-lupton-score``)
    is the cleanest: at 5σ it found 870 with 21 false detections on the varying
    pairs (benchmarks/compare_score_plain.py).
    """
    if method not in METHODS:
        raise ConfigurationError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    base = PipelineConfig(name=method, method=method)
    alard_lupton = base.alard_lupton.replace(
        fit=base.alard_lupton.fit.replace(spatial_kernel_order=2))
    return base.replace(alard_lupton=alard_lupton)
