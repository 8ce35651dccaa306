"""Count a real embedder's encode calls in a test (monkeypatch restores the methods afterwards)."""


def count_encoder_calls(monkeypatch, embedder) -> dict[str, int]:
    """{"encode_texts": n, "encode_images": n}, counting from now on; the calls still run."""
    calls = {"encode_texts": 0, "encode_images": 0}
    for name in calls:
        real = getattr(embedder, name)

        def counting(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(embedder, name, counting)
    return calls
