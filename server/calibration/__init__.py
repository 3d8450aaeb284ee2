"""Offline tools: teacher-forced evaluation through the serving path and `parcae calibrate`."""
