"""PEFT's own generic tuner suite (``tests/test_custom_models.py`` of the installed peft's sdist), re-parametrised
with peft_tensor's methods. The sdist is fetched from the package registry at test time (never committed); see
:mod:`tests.peft_suite.upstream` for how, and :mod:`tests.peft_suite.cases` for our cases and every exclusion."""
