"""config_files: one reader of fit configs, whose every error names the file (and the line)."""

import pytest

from specforge_lightning.config_files import check_fields, load_yaml, model_class_path, section
from specforge_lightning.errors import UserError


def test_missing_file_and_bad_yaml_name_the_file_and_line(tmp_path):
    with pytest.raises(UserError, match=f"config file not found: {tmp_path / 'nope.yaml'}"):
        load_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_steps: 3\n  logger: [a,\nmodel: x\n")
    with pytest.raises(UserError) as info:
        load_yaml(bad)
    assert str(info.value).startswith(f"{bad}:") and "<unicode string>" not in str(info.value)
    assert str(info.value).split(":")[1].isdigit()  # the line
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="expected a mapping"):
        load_yaml(listed)
    (tmp_path / "empty.yaml").write_text("")
    assert load_yaml(tmp_path / "empty.yaml") == {}


def test_section_follows_init_args_levels_or_none():
    nested = {"data": {"class_path": "x.Y", "init_args": {"batch_size": 2, "prepare": {"num_samples": 4}}}}
    flat = {"data": {"prepare": {"num_samples": 5}}}
    assert section(nested, "data.prepare") == {"num_samples": 4}
    assert section(flat, "data.prepare") == {"num_samples": 5}
    assert section(nested, "data") == nested["data"]
    assert section(nested, "trainer") == {}
    with pytest.raises(UserError, match="f.yaml has no trainer section"):
        section(nested, "trainer", source="f.yaml", required=True)
    with pytest.raises(UserError, match="f.yaml: data.prepare is a int"):
        section({"data": {"prepare": 3}}, "data.prepare", source="f.yaml")


def test_model_class_path_and_unknown_fields():
    assert model_class_path({"model": {"class_path": "a.B", "init_args": {}}}) == "a.B"
    assert model_class_path({"model": "a.B"}) == "a.B"
    assert model_class_path({}) is None
    with pytest.raises(UserError, match="f.yaml: model section names no class_path"):
        model_class_path({"model": {"init_args": {}}}, source="f.yaml")
    check_fields({"num_samples": 1}, ["num_samples"], where="here")
    with pytest.raises(UserError, match=r"'num_sample' \(did you mean 'num_samples'\?\) in data.prepare of f.yaml"):
        check_fields({"num_sample": 1}, ["num_samples", "max_length"], where="data.prepare of f.yaml")


def test_refusals_of_the_callbacks_are_user_errors():
    from specforge_lightning.callbacks import CheckpointError, ResumeMismatchError

    assert issubclass(CheckpointError, UserError) and issubclass(ResumeMismatchError, UserError)


def test_a_nested_optional_field_is_reset_to_null_from_the_command_line():
    from specforge_lightning.config_files import nested_null_resets

    args = ["fit", "--config", "c.yaml", "--data.init_args.prepare.regenerate_samples=null",
            "--data.init_args.prepare.max_messages", "null", "--trainer.max_time=null", "--model.init_args.lr=1e-3"]
    assert nested_null_resets(args) == [
        "fit", "--config", "c.yaml", '--data.init_args.prepare={"regenerate_samples": null}',
        '--data.init_args.prepare={"max_messages": null}', "--trainer.max_time=null", "--model.init_args.lr=1e-3",
    ]


def test_fit_accepts_a_null_reset_of_a_prepare_field(capsys):
    import yaml

    from specforge_lightning import cli

    with pytest.raises(SystemExit) as done:
        cli.main(["fit", "--config", "configs/eagle3-tiny.yaml", "--data.init_args.prepare.max_messages=7",
                  "--data.init_args.prepare.max_messages=null", "--print_config"])
    assert done.value.code in (0, None)
    prepare = yaml.safe_load(capsys.readouterr().out)["data"]["init_args"]["prepare"]
    assert prepare["max_messages"] is None and prepare["output_dir"] == "outputs/features/eagle3-tiny"
