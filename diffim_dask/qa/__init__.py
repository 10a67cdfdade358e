"""Quality you can see: source injection, completeness and purity, cutout triplets, the run report.

Public API
----------
Injection (:mod:`.injection`)
    :class:`InjectionConfig`, :func:`inject_sources` -> :class:`InjectionResult`
    (exposure with INJECTED cores, truth table, noise-free model), :func:`inject_unit`
    (the workflow hook), :func:`choose_positions`, :func:`find_extended_regions`,
    :func:`measure_psf_noise_scale`, :func:`injection_seed`,
    :func:`write_injection_truth` / :func:`read_injection_truth`.
Completeness (:mod:`.completeness`)
    :func:`match_positions` (optimal one-to-one), :func:`match_injections`,
    :func:`match_survey_truth` / :func:`read_survey_truth` (simulated-survey truth),
    :func:`fit_completeness` -> :class:`CompletenessFit` (50 % / 90 % points),
    :func:`completeness_table`, :func:`flux_statistics`, :func:`summarize_injections`
    -> :class:`InjectionSummary`, :func:`exposure_area`.
Injection tests (:mod:`.campaign`)
    :func:`run_injection_test` -> :class:`InjectionTest` (batches, subtraction,
    detection, matching on any pair).
Cutouts (:mod:`.cutouts`)
    :func:`extract_cutout`, :func:`cutout_triplet`, :func:`triplet_figure`,
    :func:`write_triplet_png`, :func:`cutout_to_fits` / :func:`cutout_from_fits`,
    :func:`add_cutout_columns`, :func:`select_gallery`, :func:`write_cutout_pngs`.
Report (:mod:`.report`)
    :func:`make_report` (``diffim-dask report RUN_DIR``), :func:`kernel_sum_grid`,
    :func:`evaluate_run_truth`, :func:`load_run`, :func:`run_cutout_triplets` (the
    gallery's science / template / difference stamps of any DIA sources of a run, for
    notebooks too).

Plotting needs matplotlib (the ``plot`` extra), imported lazily with the Agg backend.
"""

from .campaign import InjectionTest, run_injection_test
from .completeness import (
    CompletenessFit,
    InjectionSummary,
    completeness_table,
    exposure_area,
    fit_completeness,
    flux_statistics,
    match_injections,
    match_positions,
    match_survey_truth,
    read_survey_truth,
    summarize_injections,
)
from .cutouts import (
    CUTOUT_COLUMNS,
    Cutout,
    CutoutTriplet,
    add_cutout_columns,
    cutout_from_fits,
    cutout_to_fits,
    cutout_triplet,
    extract_cutout,
    select_gallery,
    triplet_figure,
    write_cutout_pngs,
    write_triplet_png,
)
from .injection import (
    INJECTION_TRUTH_COLUMNS,
    InjectionConfig,
    InjectionResult,
    choose_positions,
    find_extended_regions,
    inject_sources,
    inject_unit,
    injection_seed,
    measure_psf_noise_scale,
    read_injection_truth,
    write_injection_truth,
)
from .report import evaluate_run_truth, kernel_sum_grid, load_run, make_report, run_cutout_triplets

__all__ = [
    "CUTOUT_COLUMNS",
    "INJECTION_TRUTH_COLUMNS",
    "CompletenessFit",
    "Cutout",
    "CutoutTriplet",
    "InjectionConfig",
    "InjectionResult",
    "InjectionSummary",
    "InjectionTest",
    "add_cutout_columns",
    "choose_positions",
    "completeness_table",
    "cutout_from_fits",
    "cutout_to_fits",
    "cutout_triplet",
    "evaluate_run_truth",
    "exposure_area",
    "extract_cutout",
    "find_extended_regions",
    "fit_completeness",
    "flux_statistics",
    "inject_sources",
    "inject_unit",
    "injection_seed",
    "kernel_sum_grid",
    "load_run",
    "make_report",
    "match_injections",
    "match_positions",
    "match_survey_truth",
    "measure_psf_noise_scale",
    "read_injection_truth",
    "read_survey_truth",
    "run_cutout_triplets",
    "run_injection_test",
    "select_gallery",
    "summarize_injections",
    "triplet_figure",
    "write_cutout_pngs",
    "write_injection_truth",
    "write_triplet_png",
]
