"""Data: read raw records, validate them into examples, render chat turns, encode ids and loss masks."""
