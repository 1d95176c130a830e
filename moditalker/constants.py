"""Rates every stage agrees on (the original's): 16 kHz audio, 25 fps video, HuBERT at 50 Hz."""

SAMPLE_RATE = 16000  #: audio sample rate of HuBERT and of every stage (Hz)
FPS = 25  #: video frame rate of every stage
HUBERT_HOP = 320  #: HuBERT frame hop in samples (50 Hz at 16 kHz)
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  #: 640: two HuBERT frames per video frame
