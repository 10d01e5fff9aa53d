"""Test-side reimplementations of the reference repositories' math (REPA family), used as oracles; never imported by
the package. Each module names the repository, commit and file:line it reproduces."""
