"""Tests of the chaos harness (bench/chaos/): its audit instruments and a short smoke run."""
