"""Synthetic sample media for the hands-on exercises, made from code, never downloaded.

* :func:`speech_like_audio` / :func:`write_sample_wav`: about two seconds of a
  voiced, speech-like signal (three vowels on a gliding pitch, with an "s"
  between the second and third), 16 kHz mono 16-bit PCM. The sample rate is in
  the WAV header, so ``wave.open(path).getframerate()`` reads it back.
* :func:`sample_image` / :func:`write_sample_png`: a 224 x 224 RGB picture of
  a house under a sun, drawn so that its edges fall on the 16-pixel patch grid a
  ViT would use (14 x 14 patches), with a few shapes that cut across patches.

Both are deterministic: the only random draw (the hiss of the "s") comes from a
seeded NumPy generator, and the drawing uses integer coordinates without
anti-aliasing. Read them with the standard library and Pillow::

    import wave, numpy as np
    with wave.open("assets/sample_audio.wav") as w:
        sr = w.getframerate()
        audio = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2") / 32768.0

    from PIL import Image
    img = np.asarray(Image.open("assets/sample_image.png").convert("RGB"))  # (224, 224, 3) uint8
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SAMPLE_RATE = 16_000
AUDIO_SECONDS = 2.0
IMAGE_SIZE = 224
PATCH = 16

# Formant frequencies and bandwidths (Hz) of three vowels, textbook values for
# an adult male voice (Peterson and Barney, 1952).
VOWELS = {
    "a": ((730, 1090, 2440), (90, 110, 160)),
    "i": ((270, 2290, 3010), (60, 100, 150)),
    "u": ((300, 870, 2240), (60, 90, 150)),
}


def _envelope(t: np.ndarray, start: float, stop: float, ramp: float = 0.04) -> np.ndarray:
    """1 inside [start, stop], with raised-cosine ramps of `ramp` seconds at both ends."""
    up = np.clip((t - start) / ramp, 0.0, 1.0)
    down = np.clip((stop - t) / ramp, 0.0, 1.0)
    return (0.5 - 0.5 * np.cos(np.pi * up)) * (0.5 - 0.5 * np.cos(np.pi * down))


def _formant_gain(freq: np.ndarray, formants, bandwidths) -> np.ndarray:
    """Spectral envelope of a vowel: a sum of resonance peaks, weaker for higher formants."""
    gain = np.zeros_like(freq)
    for weight, f_c, bw in zip((1.0, 0.7, 0.35), formants, bandwidths):
        gain += weight / (1.0 + ((freq - f_c) / (bw / 2.0)) ** 2)
    return gain


def speech_like_audio(sample_rate: int = SAMPLE_RATE, seconds: float = AUDIO_SECONDS, seed: int = 0) -> np.ndarray:
    """A speech-like float32 waveform in [-1, 1]: vowels /a/, /i/, "s", /u/ on a gliding pitch.

    The voiced parts are sums of the harmonics of a pitch that rises from 110
    Hz to 170 Hz and falls back, each harmonic weighted by the formant envelope
    of the current vowel, which glides from one vowel to the next. A mel
    spectrogram shows the harmonics as stacked curves, the formants as bright
    bands that move, and the "s" as broadband energy above 4 kHz.
    """
    n = int(round(sample_rate * seconds))
    t = np.arange(n) / sample_rate
    # Pitch contour (intonation): up then down, integrated to a phase.
    f0 = 110.0 + 60.0 * np.sin(np.pi * t / seconds) ** 2
    phase = 2.0 * np.pi * np.cumsum(f0) / sample_rate

    # Vowel timeline (seconds): /a/ then /i/, a pause with an "s", then /u/.
    segments = [("a", 0.10, 0.62), ("i", 0.62, 1.05), ("u", 1.30, 1.90)]
    voiced = np.zeros(n)
    n_harmonics = int((sample_rate / 2 - 200) // 110)
    for k in range(1, n_harmonics + 1):
        freq = k * f0
        amp = np.zeros(n)
        for vowel, start, stop in segments:
            formants, bws = VOWELS[vowel]
            amp += _envelope(t, start, stop, ramp=0.05) * _formant_gain(freq, formants, bws)
        amp *= (freq < sample_rate / 2 - 200) / k  # spectral tilt of the glottal source; no aliasing
        voiced += amp * np.sin(k * phase)

    # The "s": seeded white noise, kept above 4 kHz with an FFT mask.
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(n)
    spectrum = np.fft.rfft(noise)
    freqs = np.fft.rfftfreq(n, d=1.0 / sample_rate)
    spectrum[freqs < 4000] = 0.0
    hiss = np.fft.irfft(spectrum, n=n) * _envelope(t, 1.08, 1.27, ramp=0.03)

    signal = voiced / np.max(np.abs(voiced)) + 0.25 * hiss / np.max(np.abs(hiss))
    signal *= 0.8 / np.max(np.abs(signal))  # peak at 80 % of full scale
    return signal.astype(np.float32)


def write_wav(path: str | Path, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> Path:
    """Write a mono float waveform in [-1, 1] as 16-bit PCM; the sample rate goes in the header."""
    path = Path(path)
    pcm = np.clip(np.round(np.asarray(audio, dtype=np.float64) * 32767.0), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())
    return path


def write_sample_wav(path: str | Path) -> Path:
    """The course's ``sample_audio.wav``: :func:`speech_like_audio` at 16 kHz, 2 s."""
    return write_wav(path, speech_like_audio(), SAMPLE_RATE)


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Read a 16-bit PCM WAV as (float32 array in [-1, 1], sample rate); channels on axis 0."""
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2:
            raise ValueError(f"{path}: only 16-bit PCM is supported, got {8 * w.getsampwidth()}-bit")
        sr, channels = w.getframerate(), w.getnchannels()
        data = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    audio = (data.reshape(-1, channels).T / 32768.0).astype(np.float32)
    return audio, sr


def sample_image(size: int = IMAGE_SIZE) -> Image.Image:
    """A 224 x 224 RGB scene: sky, sun, hills, a house, a tree and a tiled path.

    Most edges lie on multiples of 16 pixels, so single 16 x 16 patches hold one
    colour (sky, wall, window) while others hold an edge or a corner (roof,
    sun, tree), which is what makes patch embeddings worth looking at.
    """
    if size != IMAGE_SIZE:
        raise ValueError(f"the scene is drawn for {IMAGE_SIZE} x {IMAGE_SIZE} pixels, got {size}")
    p = PATCH
    # Sky: vertical gradient from deep blue to pale blue (rows 0..143).
    rows = np.linspace(0.0, 1.0, 9 * p)[:, None]
    top, bottom = np.array([40, 90, 200]), np.array([170, 215, 250])
    sky = np.round(top + (bottom - top) * rows).astype(np.uint8)
    pixels = np.zeros((size, size, 3), dtype=np.uint8)
    pixels[: 9 * p] = sky[:, None, :]
    pixels[9 * p :] = (70, 160, 60)  # grass
    img = Image.fromarray(pixels, mode="RGB")
    d = ImageDraw.Draw(img)

    d.ellipse([11 * p, 1 * p, 13 * p - 1, 3 * p - 1], fill=(255, 210, 40))  # sun, 2x2 patches
    d.polygon([(0, 9 * p), (3 * p, 7 * p), (6 * p, 9 * p)], fill=(90, 150, 70))  # a hill behind
    # House: walls 5 patches wide and 3 high, a roof, two windows and a door.
    d.rectangle([4 * p, 7 * p, 9 * p - 1, 11 * p - 1], fill=(200, 60, 50))
    d.polygon([(3 * p, 7 * p), (6 * p + p // 2, 4 * p), (10 * p, 7 * p)], fill=(110, 60, 30))
    d.rectangle([5 * p, 8 * p, 6 * p - 1, 9 * p - 1], fill=(180, 230, 255))
    d.rectangle([7 * p, 8 * p, 8 * p - 1, 9 * p - 1], fill=(180, 230, 255))
    d.rectangle([6 * p, 9 * p, 7 * p - 1, 11 * p - 1], fill=(90, 50, 20))
    # Tree: trunk one patch wide, round crown.
    d.rectangle([11 * p + 4, 8 * p, 12 * p - 5, 11 * p - 1], fill=(100, 65, 30))
    d.ellipse([10 * p, 5 * p, 13 * p - 1, 9 * p - 1], fill=(30, 120, 40))
    # Path of checkered tiles, one patch per tile, from the door to the bottom edge.
    for row in range(11, 14):
        for col in range(5, 8):
            light = (row + col) % 2 == 0
            d.rectangle([col * p, row * p, (col + 1) * p - 1, (row + 1) * p - 1],
                        fill=(225, 215, 190) if light else (160, 150, 130))
    # Flowers: small squares that sit inside single patches.
    for col, colour in [(1, (240, 80, 160)), (2, (250, 240, 90)), (10, (150, 90, 220)), (12, (240, 120, 40))]:
        d.rectangle([col * p + 5, 12 * p + 5, col * p + 10, 12 * p + 10], fill=colour)
    return img


def write_sample_png(path: str | Path) -> Path:
    """The course's ``sample_image.png``: :func:`sample_image`, 8-bit RGB, no metadata."""
    path = Path(path)
    sample_image().save(path, format="PNG", optimize=False, compress_level=9)
    return path
