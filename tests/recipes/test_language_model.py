"""The language-model recipe: byte-level text data split by file, next-token loss, and `stthree fit` of a GPT-2."""

import itertools
import math
import types
import zlib
from pathlib import Path

import pytest
import torch

from lightning_stthree import ST3PruningCallback
from lightning_stthree.recipes.cli import main
from lightning_stthree.recipes.data import BYTE_VOCAB_SIZE, END_OF_FILE, ByteTextDataModule
from lightning_stthree.recipes.data.text import split_of, stdlib_source_dir
from lightning_stthree.recipes.models import CausalLanguageModel

pytest.importorskip("transformers")
ROOT = Path(__file__).parents[2]


def _corpus(root: Path, files: int = 40) -> dict[str, bytes]:
    """A folder of small text files (and a binary one, which must be skipped)."""
    contents = {}
    for i in range(files):
        path = f"pkg{i % 3}/file_{i}.txt"
        contents[path] = (f"def f{i}(x):\n    return x + {i}\n" * (i + 3)).encode()
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(contents[path])
    (root / "blob.bin").write_bytes(b"\x00\x01\x02" * 100)
    return contents


def test_split_is_by_file_from_the_path_hash_and_deterministic(tmp_path: Path) -> None:
    contents = _corpus(tmp_path)
    data = ByteTextDataModule(str(tmp_path), context=16, val_fraction=0.2, test_fraction=0.2)
    data.setup("fit")
    assigned = {split: sorted(p.relative_to(tmp_path).as_posix() for p in files) for split, files in data.files.items()}
    assert sorted(itertools.chain(*assigned.values())) == sorted(contents)  # every text file once, the binary skipped
    for split, paths in assigned.items():
        for path in paths:  # the rule of the docstring, computed here independently
            bucket = zlib.crc32(path.encode()) % 10_000
            assert split == ("val" if bucket < 2000 else "test" if bucket < 4000 else "train")
            assert split_of(path, 0.2, 0.2) == split
    again = ByteTextDataModule(str(tmp_path), context=16, val_fraction=0.2, test_fraction=0.2)
    again.setup("fit")
    assert all(torch.equal(again.datasets[s].stream, data.datasets[s].stream) for s in data.datasets)


def test_windows_are_the_files_bytes_with_an_end_of_file_token_after_each(tmp_path: Path) -> None:
    contents = _corpus(tmp_path, files=12)
    data = ByteTextDataModule(str(tmp_path), context=8, val_fraction=0.0, test_fraction=0.0, batch_size=4)
    data.setup("fit")
    expected = []
    for path in sorted(contents):
        expected += [*contents[path], END_OF_FILE]
    stream = data.datasets["train"].stream.tolist()
    assert stream == expected
    windows = data.datasets["train"]
    assert len(windows) == (len(expected) - 1) // 8
    assert windows[3].tolist() == expected[24:33]  # 8 inputs and the next token of the last one
    batch = next(iter(data.train_dataloader()))
    assert batch.shape == (4, 9)
    assert batch.dtype == torch.int64
    assert data.vocab_size == BYTE_VOCAB_SIZE == 257


def test_a_folder_without_text_is_an_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "blob.bin").write_bytes(b"\x00" * 10)
    with pytest.raises(FileNotFoundError, match=rf"'{tmp_path}' holds no text files"):
        ByteTextDataModule(str(tmp_path)).setup("fit")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        ByteTextDataModule(str(tmp_path / "missing")).setup("fit")
    with pytest.raises(ValueError, match=r"`val_fraction \+ test_fraction` must be < 1"):
        ByteTextDataModule(val_fraction=0.6, test_fraction=0.4)
    with pytest.raises(TypeError, match="`extensions` must be a list of suffixes"):
        ByteTextDataModule(extensions=".py")  # type: ignore[arg-type]


def test_the_default_corpus_is_the_standard_librarys_python_sources() -> None:
    data = ByteTextDataModule(context=256)
    data.setup("fit")
    files = list(itertools.chain(*data.files.values()))
    assert files
    assert all(f.suffix == ".py" and "site-packages" not in f.parts for f in files)
    assert all(f.is_relative_to(stdlib_source_dir()) for f in files)
    assert len(data.datasets["val"]) > 100


class _Logits(torch.nn.Module):
    """A stand-in network: ``oracle`` predicts token + 1 with certainty (right exactly when each target is its input
    plus one); otherwise uniform logits."""

    def __init__(self, oracle: bool) -> None:
        super().__init__()
        self.oracle = oracle

    def forward(self, input_ids: torch.Tensor) -> object:
        logits = torch.zeros(*input_ids.shape, BYTE_VOCAB_SIZE)
        if self.oracle:
            logits.fill_(-1e4).scatter_(-1, ((input_ids + 1) % BYTE_VOCAB_SIZE).unsqueeze(-1), 1e4)
        return types.SimpleNamespace(logits=logits)


def test_loss_is_next_token_cross_entropy_and_ppl_its_exponential() -> None:
    module = CausalLanguageModel(config={"n_layer": 1, "n_embd": 16, "n_head": 2}, context=8)
    counting = torch.arange(18).reshape(2, 9)  # each target is its input + 1
    module.model = _Logits(oracle=True)
    assert float(module.loss(counting)) == 0.0  # the targets are the inputs shifted by one
    assert float(module.loss(counting.flip(1))) == pytest.approx(2e4)  # and not the other way round
    module.model = _Logits(oracle=False)
    loss = module.loss(counting)
    assert float(loss) == pytest.approx(math.log(257))  # uniform over 257 tokens
    module.val_loss.update(loss, weight=16)
    logged = {}
    module.log = lambda name, value, **_: logged.__setitem__(name, float(value))  # type: ignore[method-assign]
    module.on_validation_epoch_end()
    assert logged["val_ppl"] == pytest.approx(257.0, rel=1e-5)
    assert logged["val_bpb"] == pytest.approx(math.log2(257), rel=1e-6)


def test_bad_model_arguments_name_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="`config_class` must be the import path of a Hugging Face config class"):
        CausalLanguageModel(config_class="torch.nn.Linear")
    with pytest.raises(ValueError, match="`config` must not set `vocab_size`"):
        CausalLanguageModel(config={"vocab_size": 10})
    with pytest.raises(ValueError, match="allows 8 positions, fewer than `context=16`"):
        CausalLanguageModel(config={"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 8}, context=16)
    with pytest.raises(ValueError, match=r"`lr` must be in \(0, inf\)"):
        CausalLanguageModel(lr=0)


def test_stthree_fit_of_the_gpt2_recipe_prunes_its_conv1d_layers_and_logs_val_ppl(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cli = main(
        [
            "fit",
            "--config",
            str(ROOT / "examples" / "configs" / "gpt2_bytes.yaml"),
            "--trainer.max_steps=20",  # the acceptance command: it ends before the recipe's first validation
            "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        ]
    )
    assert cli.trainer.global_step == 20
    (pruning,) = (c for c in cli.trainer.callbacks if isinstance(c, ST3PruningCallback))
    conv1d = [n for n, m in pruning.layers.items() if type(m).__name__.endswith("Conv1D")]
    assert len(conv1d) == 16  # 4 blocks x (c_attn, c_proj, c_fc, c_proj)
    assert "model.lm_head" in pruning.layers  # tied to the embedding, pruned for both
    assert pruning.measure_sparsity()[0] == pytest.approx(0.8, abs=1e-3)
    assert math.isfinite(float(cli.trainer.callback_metrics["val_ppl"]))
    printed = capsys.readouterr().out
    assert "val_ppl" in printed
    assert "MACs per token" in printed
    last = tmp_path / "runs" / "gpt2_bytes_st3_80" / "version_0" / "checkpoints" / "last.ckpt"
    tested = main(
        [
            "test",
            "--config",
            str(ROOT / "examples" / "configs" / "gpt2_bytes.yaml"),
            f"--ckpt_path={last}",
            "--trainer.limit_test_batches=2",
            "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        ]
    )
    assert math.isfinite(float(tested.trainer.callback_metrics["test_ppl"]))
