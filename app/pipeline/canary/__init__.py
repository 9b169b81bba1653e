"""The canary: builds, their canary runs, results, metrics, judgement, known-good builds."""
