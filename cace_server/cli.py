"""The ``cace-server`` command line."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import typer

app = typer.Typer(
    name="cace-server",
    help="Serve CACE machine-learned interatomic potentials to i-PI and ASE.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Help texts show defaults in brackets ("[/tmp/ipi_]", "[cpu]"): plain text, not
    # rich markup, which reads "[/...]" as a closing tag and fails to print the help.
    rich_markup_mode=None,
)


@app.command()
def convert(
    source: Path = typer.Argument(
        ..., help="checkpoint written by torch.save(model) of the original CACE package"
    ),
    target: Path = typer.Argument(..., help="native model file to write (.safetensors)"),
    dtype: str = typer.Option("float64", help="dtype to store the weights in: float32 or float64"),
    architecture: Path = typer.Option(
        None,
        help="for a training checkpoint (checkpoint.pt, weights only): the model file "
        "(e.g. best_model.pth) whose architecture the weights belong to",
    ),
    signing_key_file: Path = typer.Option(
        None, help="sign the written file with the HMAC-SHA256 key in this file"
    ),
) -> None:
    """Convert an original CACE checkpoint to the native safetensors format.

    The checkpoint is read without the original package and without running any
    code from the pickle: anything off the allow-list is refused. Models of the
    CACE package (plain, CombinePotential, CACE-LR, LES, dipole/BEC) and bare
    representations are supported; a training checkpoint needs --architecture.
    """
    from cace_server.model import convert_original, save_model
    from cace_server.model.checkpoint import UnsafeCheckpointError, UnsupportedCheckpointError
    from cace_server.model.io import read_signing_key

    try:
        key = None if signing_key_file is None else read_signing_key(signing_key_file)
        model = convert_original(source, dtype=dtype, architecture=architecture)
    except (UnsafeCheckpointError, UnsupportedCheckpointError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    extra = {"converted_from": source.name}
    if architecture is not None:
        extra["architecture_from"] = architecture.name
    save_model(model, target, extra, signing_key=key)
    typer.echo(
        f"wrote {target} ({model.n_parameters:,} parameters, elements {list(model.elements)}, "
        f"outputs {', '.join(model.outputs)})"
    )


@app.command()
def resave(
    model: Path = typer.Argument(..., help="native model file (format version 1 or 2)"),
    output: Path = typer.Option(None, "--output", "-o", help="write here [in place]"),
    signing_key_file: Path = typer.Option(
        None, help="sign the file with the HMAC-SHA256 key in this file (model_signing_key_file)"
    ),
) -> None:
    """Re-save a model file in the current format (version 2: the config covered by
    the checksum), optionally signed; the weights and the config are kept as they are.

    A file whose checksums fail is refused (for version 1: the weights' checksum).
    """
    from cace_server.model.io import ModelFileError, read_signing_key, reseal

    try:
        key = None if signing_key_file is None else read_signing_key(signing_key_file)
        written = reseal(model, output, signing_key=key)
    except (ModelFileError, ValueError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"wrote {written} (format version 2{', signed' if key else ''})")


# Config entries shown by ``info`` (as the key) when the model's config has them (value).
_ARCHITECTURE_KEYS = {
    "max_l": "max_l",
    "max_nu": "max_nu",
    "message_passing_layers": "num_message_passing",
}


# Entries of a model's wire description (engine.info.info_dict) shown by ``info``:
# shown name -> key.
_DESCRIBED_KEYS = {
    "family": "family",
    "elements": "elements",
    "cutoff": "cutoff",
    "dtype": "dtype",
    "parameters": "n_parameters",
    "outputs": "outputs",
    "long_range": "long_range",
    "required_inputs": "required_inputs",
}


@app.command()
def info(
    model: Path = typer.Argument(
        None, help="native model file, or a committee (A,B,... or .toml) [the bundled model]"
    ),
    as_json: bool = typer.Option(False, "--json", help="print machine-readable JSON"),
    signing_key_file: Path = typer.Option(
        None, help="also check the file's signature with the HMAC-SHA256 key in this file"
    ),
) -> None:
    """Show what a model file contains (without a file: the bundled default model).

    Format-version-1 files are described (the server refuses them by default).
    """
    from cace_server.engine.info import info_dict
    from cace_server.engine.models import describe as describe_model
    from cace_server.model import ModelFileError, load_model
    from cace_server.model.committee import committee_spec, load_committee
    from cace_server.model.io import (
        SIGNATURE_KEY,
        ModelFilePolicy,
        check_integrity,
        file_digest,
        read_metadata,
    )
    from cace_server.server import default_model_path

    if model is None:
        model = default_model_path()
    try:
        policy = ModelFilePolicy.from_settings(
            True, None if signing_key_file is None else str(signing_key_file)
        )
        spec = committee_spec(str(model))
        committee = load_committee(spec, policy=policy) if spec is not None else None
    except (ModelFileError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    if committee is not None:
        offers = describe_model("committee", committee, default=True, source=str(model))
        shown = info_dict(offers, sha256=None)
        committee_summary = {
            **{key: shown[key] for key in ("elements", "cutoff", "dtype", "outputs")},
            **shown["committee"],
        }
        if as_json:
            typer.echo(json.dumps(committee_summary, indent=2))
            return
        for key, value in committee_summary.items():
            typer.echo(f"{key:>24}: {value}")
        return
    try:
        meta = read_metadata(model)
    except ModelFileError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    # A file that fails its checksums is still described (what its metadata claims),
    # with the failure, and the command exits 1.
    failure: str | None = None
    loaded = None
    try:
        integrity = check_integrity(model, policy=policy)
        loaded = load_model(model, policy=policy)
        verifies = f"{integrity.status}: {integrity.detail}"
    except ModelFileError as exc:
        failure = str(exc)
        verifies = f"FAILED: {exc}"
    cfg = meta["config"]
    summary: dict[str, Any] = {
        "file": str(model),
        "sha256": file_digest(model),
        "format_version": int(meta["format_version"]),
        "verifies": verifies,
        "signed": SIGNATURE_KEY in meta,
    }
    described: dict[str, Any] | None = None
    if loaded is not None:
        offers = describe_model(model.stem, loaded, default=True, source=str(model))
        described = info_dict(offers, sha256=summary["sha256"])
        summary.update({shown: described[key] for shown, key in _DESCRIBED_KEYS.items()})
    else:
        summary.update(
            {
                "elements": cfg.get("elements"),
                "cutoff": cfg.get("cutoff"),
                "dtype": cfg.get("dtype"),
                "parameters": None,
            }
        )
    summary.update(
        {
            **{shown: cfg[key] for shown, key in _ARCHITECTURE_KEYS.items() if key in cfg},
            "readouts": [r["name"] for r in cfg.get("readouts", ())],
            "extra": meta["extra"],
        }
    )
    if described is not None:
        for key, value in described["description"].items():
            if key == "long_range" and isinstance(value, dict):
                key = "long_range_term"  # what the model's description says of it
            summary.setdefault(key, value)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        if failure is not None:
            raise typer.Exit(1)
        return
    extra = summary.pop("extra")
    training = extra.get("training") if isinstance(extra, dict) else None
    for key, value in summary.items():
        typer.echo(f"{key:>24}: {value}")
    if training:
        errors = training["errors"]["valid"]
        typer.echo(
            f"{'trained on':>24}: {training['n_train']} structures, {training['train_files']}"
        )
        typer.echo(f"{'data sha256':>24}: {training['data_sha256']}")
        typer.echo(
            f"{'validation errors':>24}: energy RMSE {errors['energy_rmse']:.2f} meV/atom, "
            f"force RMSE {errors['forces_rmse']:.1f} meV/Å (epoch {training['epoch']})"
        )
    elif extra:
        typer.echo(f"{'extra':>24}: {extra}")
    if failure is not None:
        typer.echo(f"error: {failure}", err=True)
        raise typer.Exit(1)


def _data_keys(energy_key: str | None, forces_key: str | None, stress_key: str | None) -> Any:
    from cace_server.train.data import DataKeys

    defaults = DataKeys()
    return DataKeys(
        energy=energy_key or defaults.energy,
        forces=forces_key or defaults.forces,
        stress=stress_key or defaults.stress,
    )


@app.command()
def train(
    train_files: list[Path] = typer.Argument(None, help="extended XYZ training files"),
    config: Path = typer.Option(None, "--config", "-c", help="TOML file of training settings"),
    valid: list[Path] = typer.Option(None, help="validation file(s) [split off the training data]"),
    valid_fraction: float = typer.Option(None, help="fraction split off for validation [0.1]"),
    output: Path = typer.Option(
        None, "--output", "-o", help="model file to write [model.safetensors]"
    ),
    energy_key: str = typer.Option(None, help="info key of the energy [energy]"),
    forces_key: str = typer.Option(None, help="per-atom key of the forces [forces]"),
    stress_key: str = typer.Option(None, help="info key of the stress [stress]"),
    cutoff: float = typer.Option(None, help="cutoff radius in Å [5.0]"),
    max_l: int = typer.Option(None, help="largest angular order [3]"),
    max_nu: int = typer.Option(None, help="largest correlation order, 1..4 [3]"),
    num_message_passing: int = typer.Option(None, help="message-passing layers [0]"),
    epochs: int = typer.Option(None, help="most epochs [200]"),
    batch_size: int = typer.Option(None, help="structures per step [4]"),
    lr: float = typer.Option(None, help="initial learning rate [5e-3]"),
    energy_weight: float = typer.Option(None, help="loss weight of (eV/atom)^2 [100]"),
    forces_weight: float = typer.Option(None, help="loss weight of (eV/Å)^2 [1]"),
    stress_weight: float = typer.Option(None, help="loss weight of (eV/Å^3)^2 [1000]"),
    early_stopping: int = typer.Option(None, help="stop after this many epochs without gain [30]"),
    seed: int = typer.Option(None, help="random seed [0]"),
    device: str = typer.Option(
        None, help="cpu, cuda, cuda:N, or a list cuda:0,cuda:1 (one worker each) [cpu]"
    ),
    dtype: str = typer.Option(None, help="float32 or float64 [float32]"),
    threads: int = typer.Option(None, help="torch CPU threads [torch default]"),
    resume: bool = typer.Option(False, "--resume", help="continue from the checkpoint"),
    checkpoint: Path = typer.Option(None, help="checkpoint file [<output>.checkpoint.pt]"),
    init_from: str = typer.Option(
        None,
        help="fine-tune: start from this model (native file, original CACE checkpoint, "
        "or a committee: member i from member i); keeps its architecture; lr [1e-4] "
        "and dtype [the model's] default accordingly",
    ),
    reference_energies: str = typer.Option(
        None,
        help="with --init-from: shift (refit the per-element offsets to the data's "
        "energy reference) or keep [shift]",
    ),
    committee: int = typer.Option(
        None,
        help="train a committee of this many members (bootstrap resamples, seeds "
        "seed..seed+M-1): OUTPUT_member{i}.safetensors and OUTPUT.toml, alpha "
        "calibrated on the held-out set [1: one model]",
    ),
) -> None:
    """Fit a CACE model to energies, forces and stresses in extended XYZ files.

    With --init-from, fine-tune an existing model; with --committee M, train M
    members and write a calibrated committee file.
    """
    import dataclasses
    import sys

    from cace_server.train import (
        DataError,
        TrainConfig,
        Trainer,
        files_digest,
        read_labelled,
        split,
    )
    from cace_server.train.committee import train_committee
    from cace_server.train.finetune import fine_tune_settings, initial_sources, load_initial

    try:
        overrides = dict(
            init_from=init_from,
            reference_energies=reference_energies,
            committee=committee,
            train_files=[str(p) for p in train_files] if train_files else None,
            valid_files=[str(p) for p in valid] if valid else None,
            valid_fraction=valid_fraction,
            output=str(output) if output else None,
            checkpoint=str(checkpoint) if checkpoint else None,
            energy_key=energy_key,
            forces_key=forces_key,
            stress_key=stress_key,
            cutoff=cutoff,
            max_l=max_l,
            max_nu=max_nu,
            num_message_passing=num_message_passing,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            energy_weight=energy_weight,
            forces_weight=forces_weight,
            stress_weight=stress_weight,
            early_stopping=early_stopping,
            seed=seed,
            device=device,
            dtype=dtype,
            threads=threads,
        )
        given = TrainConfig.given(config, **overrides)
        cfg = TrainConfig.load(config, **overrides)
        starts = None
        if cfg.init_from:
            members = cfg.committee if "committee" in given else None
            sources = initial_sources(cfg.init_from, members)
            loaded = {path: load_initial(path) for path in dict.fromkeys(sources)}
            starts = [loaded[path] for path in sources]
            tuned = [fine_tune_settings(cfg, model, given) for model in loaded.values()]
            cfg = dataclasses.replace(tuned[0], committee=len(sources))
        if not cfg.train_files:
            raise ValueError("no training files: give them as arguments or train_files in --config")
        keys = _data_keys(cfg.energy_key, cfg.forces_key, cfg.stress_key)
        data = read_labelled(cfg.train_files, keys)
        if cfg.valid_files:
            train_set, valid_set = data, read_labelled(cfg.valid_files, keys)
        else:
            train_set, valid_set = split(data, cfg.valid_fraction, cfg.seed)
        digest = files_digest([*cfg.train_files, *cfg.valid_files])
        trainer = None
        if cfg.committee == 1:
            trainer = Trainer(
                cfg,
                train_set,
                valid_set,
                data_digest=digest,
                progress=sys.stderr.isatty(),
                initial=starts[0] if starts else None,
            )
            if resume:
                trainer.resume()
    except (DataError, ValueError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    try:
        if trainer is not None:
            trainer.run()
        else:
            train_committee(
                cfg,
                train_set,
                valid_set,
                initial=starts,
                resume=resume,
                data_digest=digest,
                progress=sys.stderr.isatty(),
            )
    except (DataError, ValueError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    except FloatingPointError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc


@app.command()
def evaluate(
    model: Path = typer.Argument(..., help="native model file"),
    data: list[Path] = typer.Argument(..., help="extended XYZ files with reference labels"),
    energy_key: str = typer.Option(None, help="info key of the energy [energy]"),
    forces_key: str = typer.Option(None, help="per-atom key of the forces [forces]"),
    stress_key: str = typer.Option(None, help="info key of the stress [stress]"),
    plot: Path = typer.Option(None, help="write an energy/force parity plot (PNG) here"),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N"),
    dtype: str = typer.Option(None, help="float32 or float64 [as saved]"),
) -> None:
    """Print a model's errors on labelled data; optionally draw a parity plot."""
    from cace_server.model import ModelFileError, load_served
    from cace_server.train import DataError, read_labelled
    from cace_server.train.metrics import error_table
    from cace_server.train.report import dataset_errors, parity_plot

    try:
        loaded = load_served(model, device=device, dtype=dtype)
        labelled = read_labelled(data, _data_keys(energy_key, forces_key, stress_key))
        errors = dataset_errors(loaded, labelled)
    except (ModelFileError, DataError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    name = data[0].name if len(data) == 1 else f"{len(data)} files"
    typer.echo(f"{len(labelled)} structures, {sum(d.n_atoms for d in labelled)} atoms")
    typer.echo(error_table({name: errors.summary()}))
    if plot is not None:
        try:
            written = parity_plot(errors, plot, title=f"{model.name} on {name}")
        except RuntimeError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from exc
        typer.echo(f"parity plot: {written}")


@app.command()
def calibrate(
    committee: str = typer.Argument(
        ..., help="committee: a committee file (.toml) or member files A,B,..."
    ),
    data: list[Path] = typer.Argument(..., help="extended XYZ files with reference labels"),
    quantity: str = typer.Option("energy", help="fit on energy (per atom) or forces (per atom)"),
    write: bool = typer.Option(False, "--write", help="write alpha into the committee file"),
    output: Path = typer.Option(
        None, "--output", "-o", help="write a new committee file with the fitted alpha"
    ),
    max_structures: int = typer.Option(None, help="use only the first N structures"),
    bins: int = typer.Option(5, help="bins of predicted uncertainty in the table"),
    energy_key: str = typer.Option(None, help="info key of the energy [energy]"),
    forces_key: str = typer.Option(None, help="per-atom key of the forces [forces]"),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N"),
    dtype: str = typer.Option(None, help="float32 or float64 [as saved]"),
) -> None:
    """Fit a committee's uncertainty scale alpha on labelled data; print the table."""
    import dataclasses

    import numpy as np

    from cace_server.model import ModelFileError
    from cace_server.model.committee import committee_spec, load_committee, write_committee_file
    from cace_server.train import DataError, read_labelled
    from cace_server.train.calibrate import (
        CalibrationError,
        calibration_table,
        committee_samples,
        fit_alpha,
    )

    try:
        spec = committee_spec(committee)
        if spec is None:
            raise CalibrationError(
                f"{committee} is not a committee: give a committee file (.toml) or A,B,..."
            )
        if write and spec.source is None:
            raise CalibrationError("--write needs a committee file; for A,B,... use -o NEW.toml")
        if max_structures is not None and max_structures < 1:
            raise CalibrationError(f"--max-structures must be positive, got {max_structures}")
        labelled = read_labelled(data, _data_keys(energy_key, forces_key, None))
        labelled = labelled[:max_structures]
        loaded = load_committee(dataclasses.replace(spec, alpha=1.0), device=device, dtype=dtype)
        samples = committee_samples(loaded, labelled, quantity)
        alpha = fit_alpha(samples)
    except (ModelFileError, DataError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"alpha = {alpha:.6g} (was {spec.alpha:g}), fitted on {quantity}")
    typer.echo(calibration_table(samples, alpha, bins))
    summary = {
        "data": ", ".join(p.name for p in data),
        "structures": samples.structures,
        "quantity": quantity,
        "alpha": alpha,
        "observed_rmse": float(np.sqrt(np.mean(samples.errors**2))),
        "unit": "eV/atom" if quantity == "energy" else "eV/Å",
    }
    fitted = dataclasses.replace(spec, alpha=alpha, calibration=summary)
    targets = [p for p in (spec.source if write else None, output) if p is not None]
    for target in targets:
        write_committee_file(target, fitted)
        typer.echo(f"wrote {target}")
    if not targets:
        typer.echo("(not written: --write updates the committee file, -o writes a new one)")


@app.command()
def label(
    inputs: list[Path] = typer.Argument(
        ..., help="capture files or other extended XYZ files with the structures to label"
    ),
    output: Path = typer.Option(
        ..., "--output", "-o", help="extended XYZ file to append the labelled structures to"
    ),
    calculator: str = typer.Option(
        ...,
        help="ASE calculator as MODULE:CLASS, e.g. tblite.ase:TBLite or ase.calculators.emt:EMT",
    ),
    calculator_args: str = typer.Option(
        None,
        help='keyword arguments of the calculator as a JSON object, e.g. {"method": "GFN2-xTB"}',
    ),
) -> None:
    """Label structures (energy, forces, stress) with an ASE calculator, for `train`.

    Appends each labelled structure whole to OUTPUT; a rerun skips the structures
    already there. Exit 1 when a calculation failed (the rest are written).
    """
    from cace_server.train.label import LabelError, calculator_factory, summary
    from cace_server.train.label import label as run_label

    try:
        factory = calculator_factory(calculator, calculator_args)
        report = run_label(
            inputs,
            output,
            factory,
            calculator_name=calculator,
            report_failure=lambda message: typer.echo(f"failed: {message}", err=True),
            progress=lambda message: typer.echo(message, err=True),
        )
    except (LabelError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    except KeyboardInterrupt as exc:
        typer.echo(f"interrupted: what is in {output} stays; rerun to go on", err=True)
        raise typer.Exit(130) from exc
    for note in report.notes:
        typer.echo(f"note: {note}", err=True)
    typer.echo(summary(report, output))
    if report.failures:
        typer.echo(
            f"error: {len(report.failures)} structure(s) failed; rerun to retry them", err=True
        )
        raise typer.Exit(1)


def _cli_type(annotation: Any) -> Any:
    """The type typer parses a setting's flag as: a list for tuples, X for ``X | None``."""
    from typing import get_args, get_origin

    if get_origin(annotation) in (list, tuple):
        return list[get_args(annotation)[0]]  # type: ignore[misc]
    args = [a for a in get_args(annotation) if a is not type(None)]
    return args[0] if len(args) == 1 else annotation


def _setting_parameters() -> list[inspect.Parameter]:
    """One ``--flag`` per server setting, from its field: type, help and default.

    Every option defaults to None (not given), so that only what the user typed
    overrides the TOML file and the environment; the help shows the field's default.
    """
    from cace_server.settings import server_settings

    out = []
    for name, (_, setting) in server_settings().items():
        kind = _cli_type(setting.raw_type)
        flag = "--" + name.replace("_", "-")
        decls = [f"{flag}/--no-{flag[2:]}"] if kind is bool else [flag]
        option = typer.Option(
            None,
            *decls,
            *setting.option.aliases,
            help=f"{setting.option.help} [{setting.shown_default()}]",
        )
        out.append(
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)
        )
    return out


def serve(
    config: Path = typer.Option(
        None, "--config", "-c", help="TOML file with any of these settings"
    ),
    **flags: Any,
) -> None:
    """Serve models over HTTP and/or as an i-PI driver until SIGINT/SIGTERM.

    Settings come from, in increasing priority: defaults, the --config TOML file,
    CACE_SERVER_<NAME> environment variables, and these flags.
    """
    import asyncio

    from cace_server.server import serve as run
    from cace_server.server import setup_logging
    from cace_server.settings import load_settings

    given = {name: value for name, value in flags.items() if value not in (None, [], ())}
    try:
        settings = load_settings(config, overrides=given)
    except (ValueError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    setup_logging(settings.log.level, settings.log.json)
    from cace_server.engine import DeviceFailed, EngineError
    from cace_server.server import IpiRunRefused

    try:
        asyncio.run(run(settings))
    except DeviceFailed as exc:
        # Not a usage error: the orchestrator should restart the server.
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(3) from exc
    except IpiRunRefused as exc:
        # the i-PI run cannot go on (the reason is also in the log): a batch job ends
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(4) from exc
    except (ValueError, EngineError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


# typer reads the options from the signature: the settings' flags go in after --config.
_config = inspect.signature(serve).parameters["config"]
serve.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [_config.replace(kind=inspect.Parameter.KEYWORD_ONLY), *_setting_parameters()],
    return_annotation=None,
)
app.command()(serve)


def main() -> None:
    app(prog_name="cace-server")


if __name__ == "__main__":
    main()
