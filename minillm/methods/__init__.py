"""The paper methods, one file each (a package for WanJuan-CC's pipeline), built on the primitives
in `minillm/`. A method imports the core; the core never imports a method
(tests/test_layout.py holds both rules)."""
