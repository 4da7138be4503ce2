"""Write a re-quantized copy of a GGUF model (e.g. Q4_1 -> Q4_0, which llama.cpp's CPU kernels run faster)."""

from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from chat.engine import EngineError
from chat.engine.quantize import quantize_model


class Command(BaseCommand):
    help = ("Write a re-quantized copy of a model. Use it by pointing model_path (or LLMSITE_MODEL_PATH) at the "
            "new file after checking its quality and speed (bench/engine_bench.py compares Q4_1 with Q4_0).")

    def add_arguments(self, parser):
        parser.add_argument("--model", help="Source GGUF file (default: the default model in config.yaml).")
        parser.add_argument("--type", default="q4_0", help="Target type, e.g. q4_0, q8_0, q4_k_m (default q4_0).")
        parser.add_argument("-o", "--output", help="Destination (default: next to the source, type in the name).")

    def handle(self, *args, model, type, output, **options):
        config = settings.LLMSITE
        source = Path(model) if model else Path(next(m.path for m in config.models if m.name == config.default_model))
        target = Path(output) if output else source.with_name(f"{source.stem}.{type.upper()}.gguf")
        if target.exists():
            raise CommandError(f"{target} exists already; remove it or choose another --output.")
        self.stdout.write(f"Quantizing {source.name} to {type} (a minute or two)...")
        try:
            written = quantize_model(source, target, type)
        except EngineError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(self.style.SUCCESS(
            f"Wrote {written} ({written.stat().st_size / 1e6:.0f} MB). To serve it: LLMSITE_MODEL_PATH={written}"))
