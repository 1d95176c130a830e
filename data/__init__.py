"""Preprocessing toolkit shared by AToM and MToV (audio, 3DMM, landmarks, alignment, video I/O)."""
