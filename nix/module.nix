# NixOS module: NixOS impermanence's `environment.persistence` option tree,
# applied before switch_root by impermanence_boot.py.
#
# The options under `environment.persistence` have the names, types and
# defaults of NixOS impermanence's (nix/persistence-options.nix), so an
# existing configuration keeps working when this module replaces that one
# (do not import both: they declare the same options).  With home-manager's
# NixOS module imported, each user's `home.persistence` (nix/home-manager.nix,
# injected through home-manager.sharedModules as NixOS impermanence does)
# is merged in under users.<name>.  Instead of fileSystems bind mounts and
# systemd services in stage 2, the whole tree is written as JSON
# (nix/config.nix) and applied in the initrd:
#   - systemd initrd (boot.initrd.systemd.enable, the default since
#     nixpkgs 26.05): a oneshot service ordered before
#     initrd-nixos-activation.service, --root /sysroot;
#   - scripted initrd (deprecated; its options may not exist at all):
#     boot.initrd.postMountCommands, --root /mnt-root.
# With boot.initrd.impermanence.rotateRoot, `rotate-root` runs before the
# root is mounted (in the systemd initrd impermanence-rotate-root.service,
# after the device, before sysroot.mount; else boot.initrd.postResumeCommands).
# `nixos-rebuild switch` applies new entries at once: an activation
# snippet after users and groups, or, when userborn or systemd-sysusers
# make the accounts, impermanence-boot-activate.service after theirs.
# Extra options live under `boot.initrd.impermanence`.
{ config, options, lib, pkgs, utils, ... }:

let
  inherit (lib)
    mkOption mkIf mkMerge mkAfter types literalExpression
    mapAttrs mapAttrsToList filterAttrs attrNames attrValues any all
    concatStringsSep concatMap filter optional optionalString
    escapeShellArgs foldl' unique;

  cfg = config.environment.persistence;
  icfg = config.boot.initrd.impermanence;
  rcfg = icfg.rotateRoot;
  # A path below the btrfs top level, as rotate-root reads it: components
  # neither "." nor ".." (a leading "/" means the top level, as in subvol=/root).
  subvolumePath = let c = "([^/.][^/]*|[.][^/.][^/]*|[.][.][^/]+)"; in types.strMatching "/?${c}(/${c})*";
  accounts = config.users.users;

  systemdInitrd = config.boot.initrd.systemd.enable;
  # stage-1.nix's scripted options are deprecated since nixpkgs 26.05 and
  # go away after it: never define one that is not declared.
  hasInitrdOption = name: options.boot.initrd ? ${name};
  scriptedAvailable = hasInitrdOption "postMountCommands" && hasInitrdOption "extraFiles";
  whenInitrdOption = name: value: lib.optionalAttrs (hasInitrdOption name) value;
  # With these, NixOS's `users` activation snippet is empty: the accounts
  # are made by a unit in stage 2, after activation.
  accountsFromUnits = lib.attrByPath [ "services" "userborn" "enable" ] false config
    || lib.attrByPath [ "systemd" "sysusers" "enable" ] false config;
  accountUnits = optional (lib.attrByPath [ "services" "userborn" "enable" ] false config) "userborn.service"
    ++ optional (lib.attrByPath [ "systemd" "sysusers" "enable" ] false config) "systemd-sysusers.service";

  persistenceOptions = import ./persistence-options.nix { inherit lib; };
  inherit (persistenceOptions) paths;

  # ---- home-manager: each user's home.persistence -----------------------------

  hmUsers = config.home-manager.users or { };
  hmLocations = concatMap
    (user:
      mapAttrsToList (name: location: { inherit user name location; })
        (filterAttrs (_: location: location.enable) (hmUsers.${user}.home.persistence or { })))
    (attrNames hmUsers);

  # home-manager does not know groups: as NixOS impermanence, a directory
  # without one gets its user's primary group.
  withGroup = item:
    if item.group != null then item
    else item // { group = let g = accounts.${item.user}.group or ""; in if g == "" then null else g; };

  locationKeys = [ "enable" "persistentStoragePath" "hideMounts" "allowTrash" "directories" "files" "users" ];

  # environment.persistence with every home-manager location merged in:
  # a location of the same name (enabled) gets the items under
  # users.<name>; otherwise a location of that name is made from the
  # home-manager one.  Items keep their own persistentStoragePath,
  # hideMount and allowTrash, so it does not matter which.
  persistence = foldl'
    (acc: hm:
      let
        existing = acc.${hm.name} or null;
        base =
          if existing != null && existing.enable then existing
          else {
            enable = true;
            inherit (hm.location) persistentStoragePath hideMounts allowTrash;
            directories = [ ];
            files = [ ];
            users = { };
          };
        user = base.users.${hm.user} or { directories = [ ]; files = [ ]; };
      in
      acc // {
        ${hm.name} = base // {
          users = base.users // {
            ${hm.user} = user // {
              home = hmUsers.${hm.user}.home.homeDirectory;
              directories = user.directories ++ map withGroup hm.location.directories;
              files = user.files ++ hm.location.files;
            };
          };
        };
      })
    (mapAttrs (_: location: lib.getAttrs locationKeys location) cfg)
    hmLocations;

  enabledLocations = attrValues (filterAttrs (_: location: location.enable) persistence);
  active = enabledLocations != [ ];

  itemsOf = location: location.directories ++ location.files
    ++ concatMap (user: user.directories ++ user.files) (attrValues location.users);
  allItems = concatMap itemsOf enabledLocations;
  allDirectories = concatMap
    (location: location.directories ++ concatMap (user: user.directories) (attrValues location.users))
    enabledLocations;
  allFiles = concatMap
    (location: location.files ++ concatMap (user: user.files) (attrValues location.users))
    enabledLocations;

  enabledOwn = filter (location: location.enable) (attrValues cfg);
  debugging = any (location: location.enableDebugging) enabledOwn
    || any (hm: hm.location.enableDebugging) hmLocations;
  warningsEnabled = any (location: location.enableWarnings) enabledOwn
    || any (hm: hm.location.enableWarnings) hmLocations;

  fileSystemType = types.submodule ({ name, ... }: {
    options = {
      device = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "/dev/disk/by-label/persist";
        description = ''
          The device: a path, or UUID=, LABEL=, PARTUUID=, PARTLABEL=.
        '';
      };
      label = mkOption {
        type = types.nullOr types.str;
        default = null;
        description = "Shorthand for device = /dev/disk/by-label/‹label›.";
      };
      fsType = mkOption {
        type = types.str;
        default = "auto";
        example = "ext4";
        description = ''
          The filesystem type; `auto` tries what the initrd kernel offers.
          Anything else is also added to boot.initrd.supportedFilesystems.
        '';
      };
      options = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [ "noatime" ];
        description = "Mount options, as in fstab.";
      };
    };
  });

  # ---- the JSON configuration and the script ----------------------------------

  generated = import ./config.nix {
    inherit persistence;
    users = accounts;
    groups = config.users.groups;
    fileSystems = mapAttrs (_: fs: { inherit (fs) device label fsType options; }) icfg.fileSystems;
    inherit (icfg) deviceTimeout;
    root = if rcfg.enable then {
      inherit (rcfg) device subvolume oldRoots blank;
      keep = { inherit (rcfg.keep) days count; };
    } else null;
  };

  script = "${icfg.package}/bin/impermanence_boot.py";
  python = "${icfg.python}/bin/python3";

  uncheckedConfig = pkgs.writeText "impermanence-unchecked.json" (builtins.toJSON generated);

  # A mistake fails the build, not the boot: `check` reads the file and
  # touches nothing else.  The initrd reads this very file, the one
  # /etc/impermanence.json holds.
  configFile =
    if icfg.checkConfig then
      pkgs.runCommandLocal "impermanence.json"
        { nativeBuildInputs = [ pkgs.buildPackages.python3Minimal ]; }
        ''
          python3 -I -B ${script} --config ${uncheckedConfig} check
          cp ${uncheckedConfig} $out
        ''
    else uncheckedConfig;

  verbose = icfg.verbose || debugging;

  # The interpreter the initrd gets: its binary, its own libraries
  # (libpython) and only the standard-library modules the script imports,
  # computed here from the script by dist/lib/initramfs_files.py (the
  # finder the distributions' hooks run too), byte-compiled; not
  # the whole python closure.  Its run paths point into itself, and the
  # references to the full interpreter that its files still spell
  # (compiled-in prefixes) are erased:
  # disallowedReferences makes sure nothing of it is left.  Other
  # libraries (glibc, libffi for _ctypes) stay what they are.
  initrdPython = pkgs.runCommand "impermanence-boot-python"
    {
      nativeBuildInputs = [ pkgs.buildPackages.patchelf pkgs.buildPackages.removeReferencesTo ];
      disallowedReferences = [ icfg.python ];
    }
    ''
      ${python} -I ${../dist/lib/initramfs_files.py} --json ${script} \
        --exercise '["--help"]' --exercise '["check", "--help"]' \
        --exercise '["--config", "${uncheckedConfig}", "check"]' > modules.json
      ${python} -I ${./initrd-python.py} modules.json $out > elf-files
      # ELF: the interpreter's own libraries, and run paths into $out.
      for lib in $(patchelf --print-needed $out/bin/python3); do
        case $lib in libpython*) install -m 0755 ${icfg.python}/lib/$lib $out/lib/$lib; echo $out/lib/$lib >> elf-files ;; esac
      done
      while read -r file; do
        rpath=$(patchelf --print-rpath "$file")
        patchelf --set-rpath "$(printf '%s' "$rpath" | sed "s|${icfg.python}/lib|$out/lib|g")" "$file"
      done < elf-files
      find $out -type f -exec remove-references-to -t ${icfg.python} {} +
    '';

  # Byte-compiled once, at build time, by the initrd's own interpreter:
  # run as a script, the .py would be compiled again at every boot (~18 ms,
  # more than the interpreter's own start-up).
  compiledScript = pkgs.runCommandLocal "impermanence_boot.pyc" { } ''
    ${python} -I -c 'import py_compile, sys; py_compile.compile(sys.argv[1], cfile=sys.argv[2], doraise=True, invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)' ${script} $out
  '';

  # -S: the script needs nothing `site` sets up (site-packages, .pth
  # files); skipping it saves about 1 ms a boot, ten times that on a slow CPU.
  command = root: escapeShellArgs ([ "${initrdPython}/bin/python3" "-I" "-S" "-B" "${compiledScript}" "--root" root "--config" "${configFile}" ]
    ++ optional verbose "--verbose" ++ [ "apply" ]);
  rotateCommand = escapeShellArgs ([ "${initrdPython}/bin/python3" "-I" "-S" "-B" "${compiledScript}" "--config" "${configFile}" ]
    ++ optional verbose "--verbose" ++ [ "rotate-root" ]);

  # Scripted stage 1: run a command, report a failure, and stop the boot
  # on a config or storage error only when emergencyOnError asks for it.
  stageOneRun = what: cmd: ''
    impermanence_status=0
    ${cmd} || impermanence_status=$?
    if [ "$impermanence_status" -ne 0 ]; then
      echo "impermanence: ${what} exited with status $impermanence_status (see the messages above)"
      ${optionalString icfg.emergencyOnError ''
        if [ "$impermanence_status" -ge 2 ]; then fail; fi
      ''}
    fi
  '';

  # ---- root rotation: the device's systemd unit ------------------------------

  # The /dev/disk/by-* link udev makes for a tag's value (udev's
  # encode_devnode_name, for ASCII), then `systemd-escape -p --suffix=device`
  # of that path: LABEL=nixos is dev-disk-by\x2dlabel-nixos.device.
  hexByte = c: "\\x" + lib.toLower (lib.fixedWidthString 2 "0" (lib.toHexString (lib.strings.charToInt c)));
  escapeChars = keep: text: concatStringsSep ""
    (map (c: if builtins.match keep c != null then c else hexByte c) (lib.stringToCharacters text));
  tagLinks = { LABEL = "by-label"; UUID = "by-uuid"; PARTUUID = "by-partuuid"; PARTLABEL = "by-partlabel"; };
  devicePath = spec:
    let m = builtins.match "(LABEL|UUID|PARTUUID|PARTLABEL)=(.*)" spec; in
    if m == null then spec
    else "/dev/disk/${tagLinks.${builtins.head m}}/${escapeChars "[0-9A-Za-z#+.:=@_-]" (builtins.elemAt m 1)}";
  systemdPathUnit = suffix: path:
    let
      comps = filter (c: c != "") (lib.splitString "/" path);
      name = concatStringsSep "-" (map (escapeChars "[0-9A-Za-z:_.]") comps);
    in
    (if comps == [ ] then "-" else if lib.hasPrefix "." name then "\\x2e" + lib.removePrefix "." name else name)
    + ".${suffix}";
  rotateDeviceUnit = systemdPathUnit "device" (devicePath rcfg.device);

  defaultScriptPackage = pkgs.runCommandLocal "impermanence-boot" { } ''
    install -Dm0755 ${../impermanence_boot.py} $out/bin/impermanence_boot.py
  '';

  # The running system: `impermanence-boot status`, `plan`, `apply`, `unmount`.
  tool = pkgs.writeShellScriptBin "impermanence-boot" ''
    exec ${python} -I -B ${script} "$@"
  '';

  applyCommand = "${tool}/bin/impermanence-boot --root / --config ${configFile} apply";
  saveCommand = "${tool}/bin/impermanence-boot --config ${configFile} save";

  # Owners that have no fixed id: the initrd resolves them only from a
  # kept /var/lib/nixos (not on the first boot), so their entries may be
  # left for the accounts' creation to finish.
  ownerNames = unique (filter (n: n != null) (concatMap
    (item: [ (item.user or null) (item.group or null) ]
      ++ lib.optionals (item ? parentDirectory && item.parentDirectory != null)
        [ (item.parentDirectory.user or null) (item.parentDirectory.group or null) ])
    allItems));
  dynamicOwners = filter
    (n: (accounts.${n}.uid or null) == null && (config.users.groups.${n}.gid or null) == null)
    ownerNames;

  # At activation, after users and groups exist: new entries take effect
  # at once at `nixos-rebuild switch`, and entries whose owner got its id
  # only now are finished.  Everything the initrd set up is left as it is.
  # In a dry activation: `plan`.  The systemd initrd runs the activation
  # itself (initrd-nixos-activation.service, IN_NIXOS_SYSTEMD_STAGE1=true)
  # right after impermanence-boot.service: there apply runs only when an
  # owner without a fixed id may just have been created by the users
  # snippet.  When userborn or systemd-sysusers make the accounts, they do
  # not exist yet during activation: impermanence-boot-activate.service
  # applies after them.
  inInitrdActivation = dynamicOwners != [ ] && !accountsFromUnits;
  activationScript = ''
    if [ "''${NIXOS_ACTION-}" = dry-activate ]; then
      ${tool}/bin/impermanence-boot --root / --config ${configFile} plan
  '' + optionalString (!inInitrdActivation) ''
    elif [ "''${IN_NIXOS_SYSTEMD_STAGE1-}" = true ]; then
      : # impermanence-boot.service has applied in this initrd
  '' + (if accountsFromUnits then ''
    else
      : # impermanence-boot-activate.service applies after ${concatStringsSep " " accountUnits}
    fi
  '' else ''
    else
      ${applyCommand}
    fi
  '');

  # ---- checks ----------------------------------------------------------------

  elem = builtins.elem;
  storagePaths = unique (map (location: toString location.persistentStoragePath) enabledLocations
    ++ map (item: toString item.persistentStoragePath) allItems);
  targetPaths = unique (map (d: d.dirPath) allDirectories ++ map (f: f.filePath) allFiles);

  # The NixOS filesystem a path is on, at that path or above it ("/"
  # aside: stage 1 always mounts it).
  fileSystemsAt = path: filter (fs: fs.mountPoint == path) (attrValues config.fileSystems);
  notNeededForBoot = path: any (fs: !(utils.fsNeededForBoot fs)) (fileSystemsAt path);
  ownMount = path: icfg.fileSystems ? ${path};
  selfAndParents = path: paths.parents path ++ [ (paths.concat [ path ]) ];

  # Storage that stage 1 does not mount is not there when the script runs.
  storageNotNeededForBoot = unique (filter (path: notNeededForBoot path && !(ownMount path))
    (concatMap selfAndParents storagePaths));
  # A filesystem holding targets that stage 1 does not mount is mounted by
  # stage 2 over the kept paths the initrd set up.
  ephemeralNotNeededForBoot = unique (filter notNeededForBoot (concatMap selfAndParents targetPaths));
  mountedTwice = filter (path: fileSystemsAt path != [ ]) (attrNames icfg.fileSystems);

  # A kept machine-id is bind-mounted from storage, not on a temporary
  # filesystem: systemd-machine-id-commit.service would fail on every boot
  # after the first (as NixOS impermanence, it then runs on the first only).
  machineIdPersisted = elem "/etc/machine-id" (map (f: f.filePath) allFiles);
  # A kept directory holding /var/log/journal: bound in the initrd, its
  # mount has no unit file, so systemd does not stop
  # systemd-journal-flush.service (whose ExecStop moves journald off it)
  # with it, and the unmount at shutdown fails while journald writes there.
  journalKept = any (path: elem path [ "/var" "/var/log" "/var/log/journal" ])
    (map (d: d.dirPath) allDirectories);
  varLibNixosPersisted = any
    (path: elem path [ "/" "/var" "/var/lib" "/var/lib/nixos" ])
    (map (d: d.dirPath) allDirectories ++ map (fs: fs.mountPoint) (attrValues config.fileSystems));
  usersWithoutUid = attrNames (filterAttrs (_: user: user.uid == null) accounts);
  groupsWithoutGid = attrNames (filterAttrs (_: group: group.gid == null) config.users.groups);
in
{
  options = {
    environment.persistence = mkOption {
      type = types.attrsOf (persistenceOptions.location { inherit accounts; });
      default = { };
      description = ''
        Persistent storage locations, each listing the files and
        directories that are bind mounted or linked from it into the
        freshly wiped root before switch_root.  Each attribute name is
        the path of a persistent storage location (see
        persistentStoragePath).
      '';
      example = literalExpression ''
        {
          "/persistent" = {
            hideMounts = true;
            directories = [
              "/var/log"
              "/var/lib/nixos"
              { directory = "/var/lib/colord"; user = "colord"; group = "colord"; mode = "u=rwx,g=rx,o="; }
            ];
            files = [
              "/etc/machine-id"
              { file = "/etc/nix/id_rsa"; parentDirectory = { mode = "u=rwx,g=,o="; }; }
            ];
            users.alice.directories = [ "Downloads" { directory = ".ssh"; mode = "0700"; } ];
          };
        }
      '';
    };

    boot.initrd.impermanence = {
      fileSystems = mkOption {
        type = types.attrsOf fileSystemType;
        default = { };
        example = literalExpression ''
          { "/persistent" = { device = "/dev/disk/by-label/persist"; fsType = "ext4"; options = [ "noatime" ]; }; }
        '';
        description = ''
          Persistent filesystems impermanence_boot.py mounts itself, under
          the new root, keyed by mount point.  It waits up to deviceTimeout
          seconds for each device; when a device never appears, nothing is
          bound from that location and the boot goes on (see
          emergencyOnError).  A storage path not listed here must be
          mounted by stage 1: declare it in `fileSystems` with
          `neededForBoot = true` (or keep it on the root filesystem).
          Do not list a mount point both here and in `fileSystems`.
        '';
      };

      deviceTimeout = mkOption {
        type = types.ints.unsigned;
        default = 30;
        description = "Seconds to wait for each device of boot.initrd.impermanence.fileSystems.";
      };

      verbose = mkOption {
        type = types.bool;
        default = false;
        description = "Log every action (to the console and the kernel log), not only errors.";
      };

      rotateRoot = {
        enable = mkOption {
          type = types.bool;
          default = false;
          description = ''
            Wipe a btrfs root at every boot: before the root is mounted,
            `impermanence-boot rotate-root` moves the root subvolume to
            oldRoots, deletes the old roots beyond `keep` and creates a
            fresh root (empty, or a snapshot of `blank`).  Runs in
            boot.initrd.postResumeCommands, or in the systemd initrd as
            impermanence-rotate-root.service (after the device, before
            sysroot.mount).  fileSystems."/" must mount that subvolume
            (`options = [ "subvol=root" ]`).
          '';
        };
        device = mkOption {
          type = types.strMatching "(/.+|(LABEL|UUID|PARTUUID|PARTLABEL)=.+)";
          example = "LABEL=nixos";
          description = "The btrfs filesystem holding the root subvolume: a path, or LABEL=, UUID=, PARTUUID=, PARTLABEL=.";
        };
        subvolume = mkOption {
          type = subvolumePath;
          default = "root";
          description = "The root subvolume, as a path below the filesystem's top level.";
        };
        oldRoots = mkOption {
          type = subvolumePath;
          default = "old_roots";
          description = ''
            Where the rotated roots are kept, below the top level: each is
            a subvolume named by the UTC time of its last change.
          '';
        };
        keep.days = mkOption {
          type = types.ints.between 0 100000;
          default = 30;
          description = "Old roots younger than this many days are kept.";
        };
        keep.count = mkOption {
          type = types.ints.between 0 100000;
          default = 10;
          description = "This many of the newest old roots are kept, whatever their age.";
        };
        blank = mkOption {
          type = types.nullOr subvolumePath;
          default = null;
          example = "root-blank";
          description = ''
            A subvolume below the top level whose snapshot becomes the fresh
            root; null: the fresh root is an empty subvolume.
          '';
        };
      };

      emergencyOnError = mkOption {
        type = types.bool;
        default = false;
        description = ''
          Stop the boot (emergency shell) when the configuration cannot be
          used or a persistent storage location is unavailable (exit
          status 2 or 3).  By default the boot goes on with whatever could
          be applied; the errors are in the kernel log / journal.  Single
          entries that fail (exit status 1) never stop the boot.
        '';
      };

      checkConfig = mkOption {
        type = types.bool;
        default = true;
        description = "Validate the generated JSON with `impermanence_boot.py check` at build time.";
      };

      python = mkOption {
        type = types.package;
        default = pkgs.python3Minimal;
        defaultText = literalExpression "pkgs.python3Minimal";
        description = ''
          The Python interpreter (3.9 or newer) whose binary, own libraries
          and the standard-library modules the script imports are put into
          the initrd (not its whole closure); on the running system it runs
          impermanence-boot.
        '';
      };

      package = mkOption {
        type = types.package;
        default = defaultScriptPackage;
        defaultText = "impermanence_boot.py from this repository";
        description = "A package providing bin/impermanence_boot.py.";
      };

      applyOnActivation = mkOption {
        type = types.bool;
        default = true;
        description = ''
          Run `impermanence-boot apply --root /` from an activation script
          (after the users and groups scripts), so that `nixos-rebuild
          switch` applies new entries at once, as NixOS impermanence does,
          instead of at the next boot.  What is already in place is left
          alone; a new target that already holds data is moved into
          storage when storage has nothing there yet (if both hold data,
          that entry fails and names both).  In the systemd initrd's own
          activation it runs only when an owner has no fixed uid/gid (the
          users script creates it there).  With services.userborn or
          systemd.sysusers, impermanence-boot-activate.service does this
          instead, after the unit that creates the accounts.
        '';
      };

      save.enable = mkOption {
        type = types.bool;
        default = false;
        description = ''
          Install impermanence-save.service: at shutdown, after user
          sessions and services have stopped and before the storage is
          unmounted, `impermanence-boot save` puts kept files that programs
          replaced by rename() (fish's history, dconf's database, an
          editor's atomic save; keep them with `method = "symlink"`) into
          storage and links them again.  A crash loses what changed since
          the last save.
        '';
      };

      save.interval = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "15min";
        description = ''
          With save.enable, also run `save` this often (a systemd time
          span), from impermanence-save.timer, so that a crash loses at
          most that much; null: only at shutdown.
        '';
      };

      initrdPython = mkOption {
        type = types.package;
        readOnly = true;
        default = initrdPython;
        defaultText = "the interpreter, its libraries and the modules the script imports";
        description = ''
          What the initrd gets of `python`: the interpreter binary, its own
          libraries and only the standard-library modules the script
          imports (computed at build time from the script), byte-compiled.
        '';
      };

      settings = mkOption {
        type = types.attrsOf types.anything;
        readOnly = true;
        default = generated;
        defaultText = "the generated configuration";
        description = ''
          The configuration impermanence_boot.py reads, as a Nix value
          (nix/config.nix of environment.persistence, the home-manager
          users' home.persistence, users.users, users.groups and the
          options here); configFile is its JSON.
        '';
      };

      configFile = mkOption {
        type = types.path;
        readOnly = true;
        default = configFile;
        defaultText = "the generated JSON";
        description = ''
          The generated configuration (the JSON form of
          environment.persistence); also installed as /etc/impermanence.json
          in the initrd and on the running system.
        '';
      };
    };
  };

  config = mkMerge [
    # As NixOS impermanence: its home-manager module reaches every user
    # through home-manager.sharedModules, when home-manager is imported.
    (lib.optionalAttrs (options ? home-manager.sharedModules) {
      home-manager.sharedModules = [
        ./home-manager.nix
        { home.impermanence-boot.nixosModuleImported = true; }
      ];
    })

    # The interpreter, the script and the JSON in the initrd, for apply
    # and for the root rotation.
    (whenInitrdOption "extraFiles" (mkIf ((active || rcfg.enable) && !systemdInitrd) {
      # extraFiles puts them (with their closures) into the initrd;
      # /etc/impermanence.json there is the default config for a manual
      # run from the emergency shell.
      boot.initrd.extraFiles = {
        "/etc/impermanence.json".source = configFile;
        "/etc/impermanence-boot/python".source = initrdPython;
        "/etc/impermanence-boot/script".source = icfg.package;
        "/etc/impermanence-boot/impermanence_boot.pyc".source = compiledScript;
      };
    }))

    (mkIf ((active || rcfg.enable) && !systemdInitrd) {
      assertions = [{
        assertion = scriptedAvailable;
        message = ''
          boot.initrd.impermanence: this nixpkgs has no scripted stage 1
          (boot.initrd.postMountCommands, extraFiles): set
          boot.initrd.systemd.enable = true.
        '';
      }];
    })

    (mkIf ((active || rcfg.enable) && systemdInitrd) {
      boot.initrd.systemd.storePaths = [ initrdPython icfg.package compiledScript configFile ];
      boot.initrd.systemd.contents."/etc/impermanence.json".source = configFile;
    })

    (mkIf rcfg.enable (mkMerge [
      { boot.initrd.supportedFilesystems = [ "btrfs" ]; }

      (whenInitrdOption "postResumeCommands" (mkIf (!systemdInitrd) {
        # After resuming from hibernation was tried (a resumed system
        # still uses the old root), before stage 1 mounts the root.
        boot.initrd.postResumeCommands = mkAfter (stageOneRun "rotate-root" rotateCommand);
      }))

      (mkIf systemdInitrd {
        boot.initrd.systemd.services.impermanence-rotate-root = {
          description = "Fresh btrfs root subvolume (impermanence)";
          wantedBy = [ "initrd.target" ];
          requiredBy = optional icfg.emergencyOnError "initrd.target";
          requires = [ rotateDeviceUnit ];
          # A resumed system still uses the old root.
          after = [ rotateDeviceUnit "systemd-hibernate-resume.service" ];
          before = [ "sysroot.mount" "initrd-root-fs.target" ];
          unitConfig.DefaultDependencies = false;
          serviceConfig = {
            Type = "oneshot";
            RemainAfterExit = true;
            ExecStart = rotateCommand;
            # As apply's: only status 2 or 3 stops the boot, with emergencyOnError.
            SuccessExitStatus = if icfg.emergencyOnError then "1" else "1 2 3";
            Environment = "IMPERMANENCE_NO_KMSG=1";
            StandardOutput = "journal+console";
            StandardError = "journal+console";
          };
        };
      })
    ]))

    (mkIf active (mkMerge [
      {
        boot.initrd.supportedFilesystems =
          unique (filter (t: t != "auto") (map (fs: fs.fsType) (attrValues icfg.fileSystems)));

        environment.etc."impermanence.json".source = configFile;
        environment.systemPackages = [ tool ];

        assertions = [
          {
            assertion = storageNotNeededForBoot == [ ];
            message = ''
              environment.persistence:
                  All filesystems used for persistent storage must have the option "neededForBoot" set to true
                  (or be mounted by impermanence_boot.py: boot.initrd.impermanence.fileSystems).
                  Stage 1 does not mount them otherwise, so they are not there when the initrd applies the kept paths.
                  Please fix the following filesystems:
                    ${concatStringsSep "\n      " storageNotNeededForBoot}
            '';
          }
          {
            assertion = ephemeralNotNeededForBoot == [ ];
            message = ''
              environment.persistence:
                  All filesystems used for ephemeral storage must have the option "neededForBoot" set to true.
                  They hold kept paths, and stage 2 would mount them over what impermanence_boot.py set up in the initrd.
                  Please fix the following filesystems:
                    ${concatStringsSep "\n      " ephemeralNotNeededForBoot}
            '';
          }
          {
            assertion = mountedTwice == [ ];
            message = ''
              boot.initrd.impermanence.fileSystems: these mount points are also
              declared in `fileSystems`; declare each in one place only:
                ${concatStringsSep "\n  " mountedTwice}
            '';
          }
          {
            assertion = all (fs: fs.device != null || fs.label != null) (attrValues icfg.fileSystems);
            message = "boot.initrd.impermanence.fileSystems: every entry needs `device' or `label'.";
          }
        ];

        warnings =
          optional
            (warningsEnabled && !varLibNixosPersisted && (usersWithoutUid != [ ] || groupsWithoutGid != [ ]))
            ''
              environment.persistence: /var/lib/nixos is not persisted, so users
              and groups without a fixed uid/gid get new ids on every boot, and
              their names cannot be resolved in the initrd (uid-map, gid-map).
              Users without uid: ${concatStringsSep " " usersWithoutUid}
              Groups without gid: ${concatStringsSep " " groupsWithoutGid}
            '';
      }

      (mkIf icfg.applyOnActivation {
        system.activationScripts.impermanence-boot = {
          deps = [ "users" "groups" ];
          supportsDryActivation = true;
          text = activationScript;
        };
      })

      # userborn / systemd-sysusers: the accounts exist only once their
      # unit has run (in stage 2, after activation), at every boot and,
      # restarted by sysinit-reactivation.target, at a switch.  This unit
      # is ordered after it in both, and restarted at a switch that
      # changes the configuration.
      (mkIf (icfg.applyOnActivation && accountsFromUnits) {
        systemd.services.impermanence-boot-activate = {
          description = "Persistent state for accounts made by ${concatStringsSep " and " accountUnits} (impermanence)";
          wantedBy = [ "sysinit.target" ];
          requiredBy = [ "sysinit-reactivation.target" ];
          after = accountUnits ++ [ "local-fs.target" ];
          before = [ "sysinit.target" "sysinit-reactivation.target" "shutdown.target" ];
          conflicts = [ "shutdown.target" ];
          restartTriggers = [ configFile ];
          unitConfig.DefaultDependencies = false;
          serviceConfig = {
            Type = "oneshot";
            RemainAfterExit = true;
            ExecStart = applyCommand;
            # 1: some entries failed, the rest is applied.
            SuccessExitStatus = "1";
            Environment = "IMPERMANENCE_NO_KMSG=1";
          };
        };
      })

      # save at shutdown: stopped after every unit with default
      # dependencies (sessions, services), before the storage's unmount
      # (as dist/systemd/impermanence-save.service, tests/test_nix_save.py).
      (mkIf icfg.save.enable {
        systemd.services.impermanence-save = {
          description = "Save kept files that programs replaced (impermanence)";
          wantedBy = [ "sysinit.target" ];
          after = [ "local-fs.target" "systemd-journal-flush.service" ];
          before = [ "sysinit.target" "shutdown.target" "umount.target" "final.target" ];
          conflicts = [ "shutdown.target" "umount.target" ];
          unitConfig.DefaultDependencies = false;
          unitConfig.RequiresMountsFor = storagePaths;
          serviceConfig = {
            Type = "oneshot";
            RemainAfterExit = true;
            ExecStart = "${pkgs.coreutils}/bin/true";
            ExecStop = saveCommand;
            TimeoutStopSec = 90;
            Environment = "IMPERMANENCE_NO_KMSG=1";
          };
        };
      })

      (mkIf (icfg.save.enable && icfg.save.interval != null) {
        systemd.services.impermanence-save-now = {
          description = "Save kept files that programs replaced (impermanence, periodic)";
          unitConfig.RequiresMountsFor = storagePaths;
          serviceConfig = {
            Type = "oneshot";
            ExecStart = saveCommand;
            Nice = 10;
            IOSchedulingClass = "idle";
            Environment = "IMPERMANENCE_NO_KMSG=1";
          };
        };
        systemd.timers.impermanence-save = {
          description = "Save kept files that programs replaced, every ${icfg.save.interval} (impermanence)";
          wantedBy = [ "timers.target" ];
          timerConfig = {
            OnBootSec = icfg.save.interval;
            OnUnitActiveSec = icfg.save.interval;
            Unit = "impermanence-save-now.service";
          };
        };
      })

      # systemd-machine-id-commit.service is not a unit of the initrd
      # (suppressing it there would do nothing); in stage 2 it commits
      # the id into the kept file on the first boot.
      (mkIf machineIdPersisted {
        systemd.services.systemd-machine-id-commit.unitConfig.ConditionFirstBoot = true;
      })

      # As dist/systemd/journal-flush-until-umount.conf: stopped with
      # umount.target, before the kept /var/log is unmounted (the unit is
      # ordered after that mount by its RequiresMountsFor).
      (mkIf journalKept {
        systemd.services.systemd-journal-flush = {
          conflicts = [ "umount.target" ];
          before = [ "umount.target" ];
        };
      })

      (whenInitrdOption "postMountCommands" (mkIf (!systemdInitrd) {
        boot.initrd.postMountCommands = mkAfter (stageOneRun "impermanence_boot.py" (command "/mnt-root"));
      }))

      (mkIf systemdInitrd {
        boot.initrd.systemd.services.impermanence-boot = {
          description = "Persistent state for the wiped root (impermanence)";
          wantedBy = [ "initrd.target" ];
          requiredBy = optional icfg.emergencyOnError "initrd.target";
          after = [ "initrd-root-fs.target" "initrd-fs.target" ];
          # As dist/systemd/impermanence-boot.service (tests/boot/test_dist.py).
          before = [ "initrd-nixos-activation.service" "initrd.target" "initrd-cleanup.service"
                     "initrd-switch-root.target" ];
          conflicts = [ "initrd-switch-root.target" ];
          unitConfig.DefaultDependencies = false;
          # A list: what else is set there is added (unitOption's merge).
          unitConfig.RequiresMountsFor = [ "/sysroot" ];
          serviceConfig = {
            Type = "oneshot";
            RemainAfterExit = true;
            ExecStart = command "/sysroot";
            # 1: some entries failed, the rest is applied; the boot goes on.
            SuccessExitStatus = if icfg.emergencyOnError then "1" else "1 2 3";
            # The journal keeps the messages; no second copy via /dev/kmsg.
            Environment = "IMPERMANENCE_NO_KMSG=1";
            StandardOutput = "journal+console";
            StandardError = "journal+console";
          };
        };
      })
    ]))
  ];
}
