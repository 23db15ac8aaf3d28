"""Send one signed request to the embedding API and print the vector's first values and norm.

    python -m examples.embedding.client "A man is playing a guitar." [--url URL] [--sign SM2|SHA256]
"""

from __future__ import annotations

import math

import click

from goinfer.client import Client, GoinferError
from goinfer.settings import load_settings


@click.command()
@click.argument("text")
@click.option("--url", default=None, help="Default: http://127.0.0.1:<API.Port> of the settings.")
@click.option("--sign", "sign_type", type=click.Choice(["SM2", "SHA256"]), default="SM2", show_default=True)
@click.option("--yaml", "yaml_path", default="examples/embedding/settings.yaml", show_default=True)
def main(text: str, url: str | None, sign_type: str, yaml_path: str) -> None:
    api = load_settings(yaml_path).api
    app_id, secret = next(iter(api.app_id_secret.items()))
    client = Client(url or f"http://127.0.0.1:{api.port}", app_id, secret, sign_type=sign_type,
                    sm2_private_key=api.sm2_private_key)
    try:
        data = client.call("/api/embedding", {"text": text})
    except GoinferError as exc:
        raise click.ClickException(f"error {exc.code}: {exc.msg}") from None
    vector = data["embeddings"]
    click.echo(f"requestId {data['requestId']}")
    click.echo(f"{len(vector)} dimensions, first {[round(v, 6) for v in vector[:5]]}, "
               f"norm {math.sqrt(sum(v * v for v in vector)):.6f}")


if __name__ == "__main__":
    main()
