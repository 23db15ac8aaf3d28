"""Write the encoder as a TensorFlow SavedModel, so workers load it instead of rebuilding it.

Usage: ``python -m examples.embedding.export [--out DIR]`` (default DIR:
``encoder.default_cache_dir()``). Run it once per host/deploy, before starting
workers; ``SentenceEncoder.load()`` then picks it up.

The archive holds only the serving function and the variables it reads (not
the whole tracked Keras model, which doubles the size), plus a copy of
tokenizer.json so the folder is self-contained.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import sys
import tempfile

from examples.embedding import encoder


def export_saved_model(out_dir: str) -> str:
    """Build the encoder from the weights and write it to ``out_dir``; return its path.

    The SavedModel is written to a temporary sibling folder and renamed into
    place, so a worker starting meanwhile sees either no SavedModel or a whole one.
    """
    out = pathlib.Path(out_dir).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    keras = encoder._import_keras()

    weights = encoder.weights_dir()
    model = encoder.build_keras_model(weights)
    archive = keras.export.ExportArchive()
    archive.add_endpoint(
        encoder.SAVED_MODEL_ENDPOINT,
        lambda input_ids, attention_mask: model(input_ids, attention_mask, training=False),
        input_signature=encoder.input_signature(),
    )

    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        archive.write_out(str(staging), verbose=False)
        shutil.copyfile(weights / encoder.TOKENIZER_FILE, staging / encoder.TOKENIZER_FILE)
        if out.exists():
            old = out.with_name(f".{out.name}-old-{os.getpid()}")
            out.rename(old)
            staging.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m examples.embedding.export", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--out",
        default=str(encoder.default_cache_dir()),
        help="folder to write the SavedModel to (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    path = export_saved_model(args.out)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
