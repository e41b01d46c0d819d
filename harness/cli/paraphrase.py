"""`harness paraphrase`: GPT paraphrases of the unique dev captions, attribute-checked, into a resumable JSONL."""

from __future__ import annotations

import os
from pathlib import Path

import click

from harness.cli.common import SEED, FiniteFloatRange, existing_dir, existing_file
from harness.errors import UserError


POSITIVE = click.IntRange(min=1)


def register(cli: click.Group, **groups: click.Group) -> None:
    cli.add_command(paraphrase)


@click.command()
@click.argument("source", metavar="DIR|SPLIT.json", type=click.Path(path_type=Path))
@click.option("--data", "data_dir", type=existing_dir, default=None,
              help="Dev set the SPLIT.json was made from (needed with SPLIT.json; only its TRAIN captions are sent).")
@click.option("--out", type=existing_file, default=Path("prompts/paraphrases.jsonl"), show_default=True,
              help="Output JSONL (also the resume cache); provenance goes to <out stem>.meta.json.")
@click.option("--per-caption", type=POSITIVE, default=None,
              help="Paraphrases asked per caption (default 25: the seed paper grew 483 prompts to > 11,000).")
@click.option("--model", type=str, default=None, help="Chat model (default gpt-3.5-turbo, the seed paper's).")
@click.option("--base-url", type=str, default=None,
              help="OpenAI-compatible server (default $OPENAI_BASE_URL, else api.openai.com), e.g. a local vLLM.")
@click.option("--template", "template_path", type=existing_file, default=None,
              help="Prompt template (default prompts/paraphrase.md); its sha256 is recorded.")
@click.option("--captions-per-request", type=POSITIVE, default=None,
              help="Captions sent together in one request (default 4).")
@click.option("--output-token-budget", type=POSITIVE, default=None,
              help="Fewer captions per request when their answer would exceed this many tokens (default 3000, "
                   "under gpt-3.5-turbo's 4,096 output tokens: a cut-off answer is unusable JSON).")
@click.option("--concurrency", type=POSITIVE, default=None, help="Requests in flight at once (default 4).")
@click.option("--temperature", type=FiniteFloatRange(0.0, 2.0), default=None,
              help="Sampling temperature, within the API's 0-2 (default 1.0, the API's default).")
@click.option("--seed", type=SEED, default=None, help="API seed (best effort) and backoff-jitter seed (default 0).")
@click.option("--timeout", type=FiniteFloatRange(min=0.0, min_open=True), default=None,
              help="Seconds per HTTP request (default 120).")
@click.option("--max-retries", type=click.IntRange(min=0), default=None,
              help="Retries per request on 429/5xx/timeout/connection errors and malformed answers (default 6).")
@click.option("--backoff-base", type=FiniteFloatRange(min=0.0), default=None,
              help="First retry delay in seconds, doubling (default 1).")
@click.option("--backoff-max", type=FiniteFloatRange(min=0.0), default=None,
              help="Largest retry delay in seconds (default 60).")
@click.option("--response-format", type=click.Choice(["auto", "json_schema", "json_object", "text"]), default=None,
              help="Structured output mode; auto = json_schema, stepping down if the server refuses it.")
@click.option("--near-duplicate", type=FiniteFloatRange(0.0, 1.0, min_open=True), default=None,
              help="Similarity (0-1, normalised text) from which a paraphrase is a near duplicate (default 0.9).")
@click.option("--max-words", type=POSITIVE, default=None, help="Drop paraphrases longer than this (default 60).")
@click.option("--config", "config_file", type=existing_file, default=None,
              help="ParaphraseConfig file in JSON, TOML or YAML (by extension; unknown keys are an error); options "
                   "override it.")
@click.option("--retry-partial", is_flag=True, help="Also resend captions whose cached result is partial.")
@click.option("--dry-run", is_flag=True, help="Print what would be sent, with token and cost estimates; send nothing.")
def paraphrase(source, data_dir, out, template_path, base_url, config_file, retry_partial, dry_run, **overrides):
    """Paraphrase the unique captions of DIR (or of the TRAIN side of SPLIT.json) with a chat model.

    Each paraphrase must keep its original's numbers, sizes, colours, locations, instruments, findings (named or
    implied: a Paris class or a size means a polyp), procedure, Paris classes and negations, and add no term
    outside the caption vocabulary (an "ulcer", "bleeding", an organ): checked by harness.captions, else it is
    dropped; duplicates and near duplicates are dropped too. An answer that is not the expected JSON is retried
    like a server error; a caption still without an answer is reported, gets no line in --out, and makes the
    exit code 2 (a rerun sends exactly those). Results are appended per caption as they arrive: a rerun (after
    Ctrl-C, a crash or failures) sends only what is missing. Key from OPENAI_API_KEY (never written anywhere).
    Only text is sent.

    With SPLIT.json only the TRAIN side's captions are sent, so no paraphrase of a validation prompt reaches
    training; the split records only the CSV's hash, so pass the dev set with --data.

    \b
    Examples:
      harness paraphrase ../shared/data/imageclef2024/dev-256 --dry-run
      harness paraphrase split.json --data DATA_DIR --per-caption 25 --out prompts/paraphrases.jsonl
      OPENAI_BASE_URL=http://localhost:8000/v1 harness paraphrase split.json --data DATA_DIR --model Qwen2.5-7B-Instruct
      harness train msdm-unet ... --paraphrases prompts/paraphrases.jsonl --paraphrase-strategy add
    """
    from rich.console import Console
    from rich.progress import TextColumn

    from harness.config import from_dict, read_config_file, replace
    from harness.paraphrase import (ParaphraseConfig, collect_captions, format_summary, load_template,
                                    run_paraphrase)
    from harness.paraphrase_client import safe_url
    from harness.progress import console as err_console
    from harness.progress import progress

    out_console = Console(highlight=False, soft_wrap=True)
    base = (from_dict(ParaphraseConfig, read_config_file(config_file), str(config_file)) if config_file
            else ParaphraseConfig())
    cfg = replace(base, **overrides)
    cfg.validate()
    template = load_template(template_path)
    src = collect_captions(source, data_dir)
    if src.info["kind"] == "split":
        out_console.print(
            f"Paraphrasing the TRAIN side of {source} only: {src.info['unique_captions']} unique captions "
            f"({src.info['val_only_captions_not_sent']} validation-only captions are not sent; "
            f"{src.info['captions_on_both_sides']} captions occur on both sides and are sent as training captions).")
    api_key = os.environ.get("OPENAI_API_KEY") or None
    server = safe_url(base_url or os.environ.get("OPENAI_BASE_URL")) or "https://api.openai.com/v1"

    if dry_run:
        res = run_paraphrase(src, out, cfg, template, api_key=None, base_url=base_url, dry_run=True,
                             retry_partial=retry_partial)
        p = res.plan
        out_console.print(f"[bold]dry run[/] - nothing is sent. Server {server}, model {cfg.model}, "
                          f"template {template.path} (sha256 {template.sha256[:12]}).")
        out_console.print(f"captions: {p.captions} unique, {p.cached} already in {out}, {len(p.to_send)} to send "
                          f"in {len(p.batches)} requests (up to {cfg.captions_per_request} per request within "
                          f"~{cfg.output_token_budget} answer tokens, {cfg.per_caption} paraphrases each)")
        cost = f"${p.est_cost_usd:.4f}" if p.est_cost_usd is not None else "unknown"
        out_console.print(f"estimated tokens: {p.est_prompt_tokens} in + {p.est_completion_tokens} out "
                          f"(~4 characters per token); estimated cost {cost} ({p.price_note})")
        if p.first_request:
            out_console.print("[bold]first request's messages:[/]")
            for m in p.first_request:
                out_console.print(f"--- {m['role']} ---", markup=False)
                out_console.print(m["content"], markup=False)
        if not api_key:
            out_console.print("[yellow]note: OPENAI_API_KEY is not set; a real run needs it.[/]")
        return

    bar = progress(TextColumn("{task.fields[tokens]} tokens"))
    state: dict = {}

    def on_start(n: int) -> None:
        state["task"] = bar.add_task("paraphrase", total=n, tokens=0)

    def on_advance(n: int, tokens: int) -> None:
        bar.update(state["task"], advance=n, tokens=tokens)

    def on_notice(msg: str) -> None:
        err_console.print(f"[yellow]{msg}[/]", soft_wrap=True)

    try:
        with bar:
            res = run_paraphrase(src, out, cfg, template, api_key=api_key, base_url=base_url,
                                 retry_partial=retry_partial, on_start=on_start, on_advance=on_advance,
                                 on_notice=on_notice)
    except KeyboardInterrupt:
        err_console.print(f"[yellow]interrupted: every answered caption is kept in {out}; run the same command "
                          "again to send only the rest.[/]", soft_wrap=True)
        raise
    s = res.summary
    if res.repaired_tail:
        out_console.print(f"[yellow]{out} ended in a torn line (an interrupted write); it was dropped and its "
                          "caption sent again.[/]")
    where = f"[green]{out}[/]" if res.meta else f"nothing written to {out}"
    out_console.print(f"{where} ({len(res.plan.to_send)} captions sent, {res.plan.cached} were cached)"
                      + (f"; provenance in {res.meta}" if res.meta else ""))
    for line in format_summary(s):
        out_console.print(line, markup=False)
    if s.failed:
        noun = "caption" if s.failed == 1 else "captions"
        raise UserError(f"{s.failed} {noun} failed after all retries (e.g. {s.failed_examples[0]}); run the same "
                        "command again to send only those")
