from gptfn.cli import main

raise SystemExit(main())
