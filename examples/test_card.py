"""The frame examples/bench.rs times, for the Python benches (bench_torch.py,
compare_official.py): its deterministic test card and that card as JPEG
quality 25, decoded (Pillow here, the `image` crate there: a few pixels differ,
the timings do not)."""


def test_card(w, h):
    """bench.rs's test_card: uint8 [h, w, 3]."""
    import numpy as np
    n = w * h * 3
    s = np.empty(n, dtype=np.uint64)
    v = 12345
    for i in range(n):
        v = (v * 1664525 + 1013904223) & 0xFFFFFFFF
        s[i] = v
    noise = (s >> np.uint64(28)).astype(np.int64).reshape(h, w, 3)
    x = np.arange(w, dtype=np.int64)[None, :, None]
    y = np.arange(h, dtype=np.int64)[:, None, None]
    c = np.arange(3, dtype=np.int64)[None, None, :]
    v = x * 255 // max(w, 1) + y * 128 // max(h, 1) + c * 40 + noise
    return (16 + v % 224).astype(np.uint8)


def test_image(w, h):
    """bench.rs's test_image: the card as JPEG quality 25, decoded (Pillow here)."""
    import io

    import numpy as np
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(test_card(w, h)).save(buf, format="JPEG", quality=25)
    buf.seek(0)
    return np.array(Image.open(buf).convert("RGB"))
