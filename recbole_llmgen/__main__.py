from recbole_llmgen.cli import main

raise SystemExit(main())
