from particle_vae.cli import main

raise SystemExit(main())
